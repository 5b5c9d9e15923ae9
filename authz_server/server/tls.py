"""TLS and mutual TLS on the gRPC port, with certificates reloaded when they change on disk.

grpc's own dynamic server credentials do the work (`grpc.dynamic_ssl_server_credentials`): gRPC
core calls `fetch` before each new handshake; it answers None (keep what you have) unless the
files' modification stamps changed, then the new pair and client CA. Connections already open
keep the certificate they were made with, so calls in flight are never dropped by a rotation.
A pair that does not match (the key written before the certificate, a half-copied file) is not
taken: the old one stays until the files agree, and an ERROR is logged.

With a client CA, the handshake requires a client certificate signed by it and valid now: one
without a certificate, from another CA or expired never gets a call through (the client sees
UNAVAILABLE, "handshake failed": gRPC answers no call on a connection that was never made).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authz_server.runtime.certificates import MERCHANT_URI_PREFIX
from authz_server.server.auth import Principal, PrincipalKind, Unauthenticated

log = logging.getLogger(__name__)

# Handshakes look at the files' stamps at most this often.
RELOAD_CHECK_SECONDS = 1.0
IDENTITY_FIELDS = ("uri_san", "common_name")


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


@dataclass
class ReloadingCertificates:
    certificate_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    stamps: tuple[tuple[int, int, int], ...] = field(default=(), init=False)
    checked: float = field(default=0.0, init=False)
    reloads: int = field(default=0, init=False)

    @property
    def files(self) -> tuple[Path, ...]:
        extra = (self.client_ca_file,) if self.client_ca_file is not None else ()
        return (self.certificate_file, self.key_file, *extra)

    def _configuration(self) -> Any:
        certificate = self.certificate_file.read_bytes()
        key = self.key_file.read_bytes()
        matching_pair(certificate, key)
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        if client_ca is not None:
            x509.load_pem_x509_certificates(client_ca)
        return grpc.ssl_server_certificate_configuration(
            [(key, certificate)], root_certificates=client_ca
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        self.stamps = tuple(_stamp(path) for path in self.files)
        initial = self._configuration()
        return grpc.dynamic_ssl_server_credentials(
            initial, self.fetch, require_client_authentication=self.client_ca_file is not None
        )

    def fetch(self) -> Any:
        """Called by gRPC core before a handshake: None keeps the current configuration."""
        now = time.monotonic()
        if now - self.checked < RELOAD_CHECK_SECONDS:
            return None
        self.checked = now
        try:
            stamps = tuple(_stamp(path) for path in self.files)
            if stamps == self.stamps:
                return None
            configuration = self._configuration()
        except Exception as error:  # never into gRPC core: keep the current certificates
            log.error("TLS certificates not reloaded, keeping the current ones: %r", error)
            return None
        self.stamps = stamps
        self.reloads += 1
        log.info("TLS certificates reloaded from %s", self.certificate_file)
        return configuration


def matching_pair(certificate_pem: bytes, key_pem: bytes) -> None:
    """Raises ValueError unless the key is the certificate's."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != certificate.public_key().public_bytes(
        encoding, public
    ):
        raise ValueError("the key does not belong to the certificate")


def fingerprint(certificate_pem: bytes) -> str:
    """SHA-256 of the certificate's DER, hex (what `openssl x509 -fingerprint -sha256` shows)."""
    der = x509.load_pem_x509_certificate(certificate_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


class ClientIdentity:
    """The merchant a verified client certificate names: `medwallet:merchant:<id>` as a URI SAN
    (`uri_san`) or as the subject CN (`common_name`). None: the certificate names no merchant
    (an operator's or a channel's, who add a token)."""

    def __init__(self, identity_field: str = "uri_san") -> None:
        if identity_field not in IDENTITY_FIELDS:
            raise ValueError(f"client identity field must be one of {IDENTITY_FIELDS}")
        self.property = "peer_uri" if identity_field == "uri_san" else "x509_common_name"
        # certificate PEM -> fingerprint (parsed once per certificate, a bounded cache)
        self.fingerprints: dict[bytes, str] = {}

    def merchant(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal | None:
        properties = context.auth_context()
        named = [
            value.decode()[len(MERCHANT_URI_PREFIX) :]
            for value in properties.get(self.property, ())
            if value.startswith(MERCHANT_URI_PREFIX.encode())
        ]
        if not named:
            return None
        if len(named) > 1:
            raise Unauthenticated("the client certificate names more than one merchant")
        pem = next(iter(properties.get("x509_pem_cert", ())), b"")
        known = self.fingerprints.get(pem)
        if known is None:
            if len(self.fingerprints) > 10_000:
                self.fingerprints.clear()
            known = self.fingerprints[pem] = fingerprint(pem)
        return Principal(
            kind=PrincipalKind.MERCHANT, merchant_id=named[0], credential=f"cert:{known}"
        )
