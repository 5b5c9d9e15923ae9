"""TLS and mutual TLS on the gRPC port, with certificates reloaded when they change on disk.

grpc's own dynamic server credentials do the work (`grpc.dynamic_ssl_server_credentials`): gRPC
core calls `fetch` before each new handshake; it answers None (keep what you have) unless the
files' modification stamps changed, then the new pair and client CA. Connections already open
keep the certificate they were made with, so calls in flight are never dropped by a rotation.
A pair that does not match (the key written before the certificate, a half-copied file) is not
taken: the old one stays until the files agree, and an ERROR is logged.

With a client CA and MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK=handshake, the handshake requires a
client certificate signed by it and valid now: one without a certificate, from another CA or
expired never gets a call through (the client sees UNAVAILABLE, "handshake failed": gRPC answers
no call on a connection that was never made). The default with a client CA is the service's own
TLS front instead (server/tls_front.py: such calls are answered UNAUTHENTICATED); it reloads the
same files through `ReloadingCertificates` and reads merchants with `certificate_merchant`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from authz_server.domain import validation
from authz_server.domain.errors import InvalidArgument
from authz_server.runtime.certificates import MERCHANT_URI_PREFIX
from authz_server.server.auth import Principal, PrincipalKind, Unauthenticated

log = logging.getLogger(__name__)

# Handshakes look at the files' stamps at most this often.
RELOAD_CHECK_SECONDS = 1.0
IDENTITY_FIELDS = ("uri_san", "common_name")
T = TypeVar("T")


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

    def _read(self) -> Files:
        certificate = self.certificate_file.read_bytes()
        key = self.key_file.read_bytes()
        matching_pair(certificate, key)
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        if client_ca is not None:
            x509.load_pem_x509_certificates(client_ca)
        return Files(certificate, key, client_ca)

    def initial(self, build: Callable[[Files], T]) -> T:
        """What `build` makes of the files as they are now (raises if they do not agree)."""
        self.stamps = tuple(_stamp(path) for path in self.files)
        return build(self._read())

    def reloaded(self, build: Callable[[Files], T]) -> T | None:
        """What `build` makes of the files if they changed since last taken, else None. Looks
        at most once per RELOAD_CHECK_SECONDS; files that do not agree (or that `build`
        refuses) are not taken: None, and an ERROR logged."""
        now = time.monotonic()
        if now - self.checked < RELOAD_CHECK_SECONDS:
            return None
        self.checked = now
        try:
            stamps = tuple(_stamp(path) for path in self.files)
            if stamps == self.stamps:
                return None
            built = build(self._read())
        except Exception as error:  # never into gRPC core: keep the current certificates
            log.error("TLS certificates not reloaded, keeping the current ones: %r", error)
            return None
        self.stamps = stamps
        self.reloads += 1
        log.info("TLS certificates reloaded from %s", self.certificate_file)
        return built

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC's own TLS (MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK=handshake)."""
        return grpc.dynamic_ssl_server_credentials(
            self.initial(_grpc_configuration),
            self.fetch,
            require_client_authentication=self.client_ca_file is not None,
        )

    def fetch(self) -> Any:
        """Called by gRPC core before a handshake: None keeps the current configuration."""
        return self.reloaded(_grpc_configuration)


@dataclass(frozen=True)
class Files:
    """The PEM contents of the certificate, key and client CA files, read together."""

    certificate: bytes
    key: bytes
    client_ca: bytes | None


def _grpc_configuration(files: Files) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(files.key, files.certificate)], root_certificates=files.client_ca
    )


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


def _check_field(identity_field: str) -> None:
    if identity_field not in IDENTITY_FIELDS:
        raise ValueError(f"client identity field must be one of {IDENTITY_FIELDS}")


def merchant_named(values: list[str], fingerprint_hex: str) -> Principal | None:
    """The merchant principal `values` (a certificate's URI SANs or CNs) name, proved by the
    certificate of that fingerprint; None: they name none."""
    named = [
        value[len(MERCHANT_URI_PREFIX) :]
        for value in values
        if value.startswith(MERCHANT_URI_PREFIX)
    ]
    if not named:
        return None
    if len(named) > 1:
        raise Unauthenticated("the client certificate names more than one merchant")
    try:  # what a registered merchant's id can be: never empty, no spaces or other characters
        validation.identifier("merchant_id", named[0])
    except InvalidArgument:
        raise Unauthenticated("the client certificate's merchant id is not a valid id") from None
    return Principal(
        kind=PrincipalKind.MERCHANT, merchant_id=named[0], credential=f"cert:{fingerprint_hex}"
    )


def certificate_merchant(certificate: x509.Certificate, identity_field: str) -> Principal | None:
    """What ClientIdentity reads from gRPC's auth context, read from a verified certificate
    itself (the TLS front's)."""
    _check_field(identity_field)
    if identity_field == "uri_san":
        try:
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return None
        values = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    else:
        values = [
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    der = certificate.public_bytes(serialization.Encoding.DER)
    return merchant_named(values, hashlib.sha256(der).hexdigest())


class ClientIdentity:
    """The merchant a verified client certificate names: `medwallet:merchant:<id>` as a URI SAN
    (`uri_san`) or as the subject CN (`common_name`). None: the certificate names no merchant
    (an operator's or a channel's, who add a token). Reads gRPC's auth context (gRPC's own TLS,
    which verified the certificate in the handshake)."""

    # a client certificate is required (Authenticator: merchant tokens are refused)
    mutual = True

    def __init__(self, identity_field: str = "uri_san") -> None:
        _check_field(identity_field)
        self.property = "peer_uri" if identity_field == "uri_san" else "x509_common_name"
        # certificate PEM -> fingerprint (parsed once per certificate, a bounded cache)
        self.fingerprints: dict[bytes, str] = {}

    def merchant(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal | None:
        properties = context.auth_context()
        values = [value.decode(errors="replace") for value in properties.get(self.property, ())]
        if not any(value.startswith(MERCHANT_URI_PREFIX) for value in values):
            return None
        pem = next(iter(properties.get("x509_pem_cert", ())), b"")
        known = self.fingerprints.get(pem)
        if known is None:
            if len(self.fingerprints) > 10_000:
                self.fingerprints.clear()
            known = self.fingerprints[pem] = fingerprint(pem)
        return merchant_named(values, known)
