"""A private CA and certificates for trying TLS and mutual TLS locally (`medwallet-authz
make-certs`), also used by the tests. Not a PKI: keys are written unencrypted beside the
certificates, readable by the owner only."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MERCHANT_URI_PREFIX = "medwallet:merchant:"
DAY = datetime.timedelta(days=1)
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        certificate, key = directory / f"{name}.crt", directory / f"{name}.key"
        certificate.write_bytes(self.certificate_pem)
        # 0600 from its creation on, not after a chmod: written first with the umask's mode
        # (0644 under the usual 022), the key (the CA's too) was readable by any local user
        # until the chmod; one who opened it then kept reading it. A new file put in place, so
        # a key file already there (and whoever holds it open) never sees the new key.
        temporary = directory / f".{name}.key.{os.getpid()}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(self.key_pem)
            os.replace(temporary, key)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return certificate, key


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MedWallet (local trial)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(common_name: str = "MedWallet local CA", days: int = 3650) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + days * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    server_names: tuple[str, ...] = (),
    merchant_id: str | None = None,
    uris: tuple[str, ...] = (),
    is_ca: bool = False,
    not_before: datetime.datetime | None = None,
    days: int = 825,
) -> Issued:
    """A leaf certificate: a server's (DNS/IP SANs) or a client's (a merchant's carries the URI
    SAN `medwallet:merchant:<id>`); `uris`, more URI SANs as they are; `is_ca`, an intermediate
    CA's (the tests' odd chains)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or datetime.datetime.now(datetime.UTC) - DAY
    names: list[x509.GeneralName] = []
    for name in server_names:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    if merchant_id is not None:
        names.append(x509.UniformResourceIdentifier(MERCHANT_URI_PREFIX + merchant_id))
    names.extend(x509.UniformResourceIdentifier(uri) for uri in uris)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + days * DAY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if is_ca:
        builder = builder.add_extension(CA_KEY_USAGE, critical=True)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def make_local_set(directory: Path, merchants: list[str]) -> list[Path]:
    """ca.crt/.key, server.crt/.key (localhost, 127.0.0.1, ::1), one client pair per merchant
    (merchant-<id>.crt/.key) and client.crt/.key for admin and channels (who add a token)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    written = list(ca.write(directory, "ca"))
    server = issue(ca, "localhost", server_names=("localhost", "127.0.0.1", "::1"))
    written += server.write(directory, "server")
    written += issue(ca, "medwallet-operator").write(directory, "client")
    for merchant_id in merchants:
        merchant = issue(ca, f"merchant {merchant_id}", merchant_id=merchant_id)
        written += merchant.write(directory, f"merchant-{merchant_id}")
    return written
