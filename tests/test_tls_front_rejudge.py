"""The TLS front's judging again of open connections when the client CA file changes
(server/tls_front.py judge_again): an open connection is judged as a new handshake of the same
client would be. Here the trust file holds a root and an intermediate CA, and clients send only
their leaf (the service completes the chain from its file, as operators set it up so clients
need not be reissued a chain): taking the intermediate out of the file refuses new handshakes
of its leaves, so it must refuse their open connections too."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from authz_server.runtime.certificates import CA_KEY_USAGE, Issued, issue
from tests.harness import Harness
from tests.test_tls import MERCHANT_A, Pki, mutual_tls_harness
from tests.test_tls_front_audit import SERVED, get_code

pytestmark = pytest.mark.backend_neutral


def root_with_intermediates(common_name: str) -> Issued:
    """A self-signed CA that may sign intermediate CAs (make_ca's path length is 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("rejudge-pki"))


@pytest.fixture(scope="module")
def layered(pki: Pki) -> tuple[Issued, Issued, Issued]:
    root = root_with_intermediates("layered root")
    intermediate = issue(root, "layered intermediate", is_ca=True, days=20)
    merchant = issue(intermediate, "a", merchant_id=MERCHANT_A, days=10)
    (pki.directory / "ca.crt").write_bytes(root.certificate_pem + intermediate.certificate_pem)
    return root, intermediate, merchant


@pytest.fixture(scope="module")
def front(
    pki: Pki, layered: tuple[Issued, Issued, Issued], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    running = mutual_tls_harness(
        pki.directory,
        tmp_path_factory.mktemp("rejudge-service"),
    )
    yield running
    running.close()


def test_an_intermediate_taken_out_of_the_file_stops_serving_its_open_connections(
    pki: Pki, layered: tuple[Issued, Issued, Issued], front: Harness
) -> None:
    root, _intermediate, merchant = layered
    with pki.channel(front.port, merchant) as old:
        assert get_code(old) == SERVED  # the leaf alone: the chain completed from the file
        (pki.directory / "ca.crt").write_bytes(root.certificate_pem)  # the intermediate out
        deadline = time.monotonic() + 10
        fresh_code = SERVED
        while fresh_code == SERVED and time.monotonic() < deadline:
            time.sleep(0.3)
            with pki.channel(front.port, merchant) as fresh:
                fresh_code = get_code(fresh)
        # a new handshake of the same client is refused: its chain no longer completes
        assert fresh_code == grpc.StatusCode.UNAUTHENTICATED
        time.sleep(1.5)  # the watcher has judged the open connections again by now
        assert get_code(old) == grpc.StatusCode.UNAUTHENTICATED


def test_a_new_server_certificate_alone_does_not_judge_the_open_connections_again(
    tmp_path: Path,
) -> None:
    """Judging again verifies every open connection's chain (~0.14 ms each, MAX_CONNECTIONS of
    them: over a second of event loop, in chunks). Only a change of the client CA file can
    change a verdict; a server certificate renewed (routine rotation) must not cost that."""
    from authz_server.server.tls import ReloadingCertificates
    from authz_server.server.tls_front import TlsFront

    pki = Pki(tmp_path)
    certificates = ReloadingCertificates(
        Path(tmp_path / "server.crt"), Path(tmp_path / "server.key"), Path(tmp_path / "ca.crt")
    )
    front = TlsFront(certificates)

    class Client:
        judged = 0

        def judge_again(self) -> None:
            self.judged += 1

    client = Client()
    front.connections.add(client)  # type: ignore[arg-type]

    async def scenario() -> None:
        renewed = issue(pki.ca, "localhost", server_names=("localhost", "127.0.0.1"))
        renewed.write(tmp_path, "server")
        certificates.checked = 0.0
        before = front.context
        assert front.current_context() is not before  # the new certificate taken
        assert front.rejudging is None and front.peers.generation == 0
        (tmp_path / "ca.crt").write_bytes(pki.ca.certificate_pem + pki.other_ca.certificate_pem)
        certificates.checked = 0.0
        front.current_context()
        assert front.peers.generation == 1  # every verdict out of date at once
        assert front.rejudging is not None
        await front.rejudging
        assert client.judged == 1  # the client CA file changed: judged again

    asyncio.run(scenario())
