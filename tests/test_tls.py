"""TLS and mutual TLS with real certificates made here: a merchant is who its certificate says,
clients without a good certificate get no call through (UNAUTHENTICATED, saying why, through
the service's TLS front; UNAVAILABLE, refused in the handshake, with gRPC's own TLS), revoked
tokens stop working within a second, and a rotated server certificate is picked up while calls
go on."""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    relationship_pb2_grpc,
)
from authz_server.runtime.certificates import Issued, issue, make_ca
from authz_server.server import tls_front, tokens
from tests import engine_factories as ef
from tests import factories
from tests.harness import ADMIN, Harness, bearer

pytestmark = pytest.mark.backend_neutral

MERCHANT_A, MERCHANT_B = "tls-merchant-a", "tls-merchant-b"


class Pki:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = make_ca()
        self.other_ca = make_ca("another CA")
        self.server = issue(self.ca, "localhost", server_names=("localhost", "127.0.0.1"))
        self.operator = issue(self.ca, "operator")
        self.a = issue(self.ca, "a", merchant_id=MERCHANT_A)
        self.b = issue(self.ca, "b", merchant_id=MERCHANT_B)
        self.a_from_other_ca = issue(self.other_ca, "a", merchant_id=MERCHANT_A)
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        self.a_expired = issue(self.ca, "a", merchant_id=MERCHANT_A, not_before=past, days=2)
        future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
        self.a_not_yet_valid = issue(self.ca, "a", merchant_id=MERCHANT_A, not_before=future)
        (directory / "ca.crt").write_bytes(self.ca.certificate_pem)
        self.server.write(directory, "server")

    def channel(
        self, port: int, client: Issued | None, trust: Issued | None = None
    ) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            (trust or self.ca).certificate_pem,
            client.key_pem if client else None,
            client.certificate_pem if client else None,
        )
        return grpc.secure_channel(f"localhost:{port}", credentials)


def mutual_tls_harness(certificates: Path, directory: Path, **settings: Any) -> Harness:
    """The service on TLS with `certificates`' server.crt/.key, and their ca.crt as the client
    CA (mutual TLS); `settings` as Harness takes them."""
    return Harness(
        directory,
        tls_cert_file=str(certificates / "server.crt"),
        tls_key_file=str(certificates / "server.key"),
        tls_client_ca_file=str(certificates / "ca.crt"),
        **settings,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_harness(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    running = mutual_tls_harness(
        pki.directory,
        tmp_path_factory.mktemp("tls-service"),
        extra_tokens={"test-revocable-admin": {"kind": "admin"}},
    )
    yield running
    running.close()


@pytest.fixture(scope="module")
def operator(pki: Pki, tls_harness: Harness) -> Iterator[grpc.Channel]:
    with pki.channel(tls_harness.port, pki.operator) as channel:
        yield channel


@pytest.fixture(scope="module")
def beneficiary(operator: grpc.Channel) -> str:
    """A resident with 100.00 yuan of quota; both merchants registered as hospitals."""
    registry = registry_pb2_grpc.RegistryServiceStub(operator)
    relationships = relationship_pb2_grpc.RelationshipServiceStub(operator)
    for merchant_id in (MERCHANT_A, MERCHANT_B):
        ef.merchant(registry, merchant_id, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    beneficiary_id = factories.resident(registry)
    holder = factories.employee(registry, balance_fen=50_000)
    factories.active_relationship(relationships, holder, beneficiary_id, 10_000)
    return beneficiary_id


def first(stream: Callable[[], Iterable[object]]) -> object:
    """The first answer of a streaming call."""
    return next(iter(stream()))


def code_of(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_merchant_certificate_is_served_as_its_merchant(
    pki: Pki, tls_harness: Harness, beneficiary: str
) -> None:
    with pki.channel(tls_harness.port, pki.a) as channel:
        engine = authorization_pb2_grpc.AuthorizationServiceStub(channel)
        answer = engine.Authorize(ef.medical(beneficiary, 1_000), timeout=10)
        assert answer.decision == authorization_pb2.DECISION_APPROVED
        seen = engine.GetAuthorization(
            authorization_pb2.GetAuthorizationRequest(authorization_id=answer.authorization_id),
            timeout=10,
        )
        assert seen.authorization.merchant_id == MERCHANT_A
    # merchant B's certificate cannot see, void or capture A's authorization
    with pki.channel(tls_harness.port, pki.b) as channel:
        engine = authorization_pb2_grpc.AuthorizationServiceStub(channel)
        request = authorization_pb2.GetAuthorizationRequest(
            authorization_id=answer.authorization_id
        )
        assert code_of(lambda: engine.GetAuthorization(request, timeout=10)) == (
            grpc.StatusCode.NOT_FOUND
        )
        void = authorization_pb2.VoidRequest(authorization_id=answer.authorization_id)
        assert code_of(lambda: engine.Void(void, timeout=10)) == grpc.StatusCode.NOT_FOUND


def test_a_merchant_certificate_cannot_take_another_merchants_token(
    pki: Pki, tls_harness: Harness, beneficiary: str
) -> None:
    """B's certificate with A's token (or any token) is refused: the certificate is the
    merchant's identity, and a merchant token alone is refused under mutual TLS."""
    with pki.channel(tls_harness.port, pki.b) as channel:
        engine = authorization_pb2_grpc.AuthorizationServiceStub(channel)
        request = ef.medical(beneficiary, 100)
        metadata = bearer("test-merchant-a")
        assert code_of(lambda: engine.Authorize(request, metadata=metadata, timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    with pki.channel(tls_harness.port, pki.operator) as channel:
        engine = authorization_pb2_grpc.AuthorizationServiceStub(channel)
        assert code_of(lambda: engine.Authorize(request, metadata=metadata, timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


REFUSALS = {
    "none": "no client certificate",
    "other_ca": "not signed by a CA this service trusts",
    "expired": "has expired",
    "not_yet_valid": "is not yet valid",
    "server_certificate": "not for client authentication",
}


@pytest.mark.parametrize("client", sorted(REFUSALS))
def test_a_call_without_a_good_certificate_is_unauthenticated(
    pki: Pki, tls_harness: Harness, beneficiary: str, client: str
) -> None:
    """The service's TLS front (the default with a client CA) lets the handshake through and
    answers every call UNAUTHENTICATED, saying why: a client does not retry it as transient. A
    token does not stand in for the certificate."""
    certificate = {
        "none": None,
        "other_ca": pki.a_from_other_ca,
        "expired": pki.a_expired,
        "not_yet_valid": pki.a_not_yet_valid,
        "server_certificate": pki.server,  # the CA's, but for servers only (extended key usage)
    }
    with pki.channel(tls_harness.port, certificate[client]) as channel:
        engine = authorization_pb2_grpc.AuthorizationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            engine.Authorize(ef.medical(beneficiary, 100), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert REFUSALS[client] in (refused.value.details() or "")
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        request = registry_pb2.GetParticipantRequest(participant_id="nobody")
        assert code_of(lambda: registry.GetParticipant(request, metadata=ADMIN, timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_health_and_reflection_need_a_good_certificate_too(pki: Pki, tls_harness: Harness) -> None:
    """They ask for no principal, so the front's gate answers for them: every method of every
    kind (unary, server streaming, bidirectional) is refused on a refused connection."""
    check = health_pb2.HealthCheckRequest(service="")
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    for client in (pki.operator, None):
        with pki.channel(tls_harness.port, client) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            calls = [
                partial(health.Check, check, timeout=5),
                partial(first, partial(health.Watch, check, timeout=5)),
                partial(
                    first, partial(reflection.ServerReflectionInfo, iter([listing]), timeout=5)
                ),
            ]
            codes = {code_of(call) for call in calls}
            if client is None:
                assert codes == {grpc.StatusCode.UNAUTHENTICATED}
            else:
                assert codes == {grpc.StatusCode.OK}


def test_the_front_carries_large_bodies_and_drops_silent_handshakes(
    pki: Pki, tls_harness: Harness
) -> None:
    """Request bodies of megabytes cross the front towards the gRPC server (a 3 MiB garbage
    body is the edge's INVALID_ARGUMENT, one over the 4 MiB limit RESOURCE_EXHAUSTED; answers
    are small: the other direction's backpressure is not exercised here), and a connection that
    never finishes its handshake is closed after the front's limit."""
    with pki.channel(tls_harness.port, pki.operator) as channel:
        method = "/medwallet.v1.RegistryService/GetParticipant"
        call = channel.unary_unary(method)
        for size, expected in (
            (3 * 1024 * 1024, grpc.StatusCode.INVALID_ARGUMENT),
            (5 * 1024 * 1024, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ):
            body = b"\xff" * size
            assert code_of(partial(call, body, metadata=ADMIN, timeout=30)) == expected
    assert tls_harness.app.front is not None
    tls_harness.app.front.handshake_seconds = 0.5
    try:
        with socket.create_connection(("127.0.0.1", tls_harness.port), timeout=5) as silent:
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError):  # closed or reset, nothing sent
                assert silent.recv(1) == b""
            assert time.monotonic() - started < 4
    finally:
        tls_harness.app.front.handshake_seconds = tls_front.HANDSHAKE_SECONDS


def test_the_front_resumes_no_tls_session(pki: Pki, tls_harness: Harness) -> None:
    """A resumed session sends no certificate and runs no verification: were one resumed, a
    certificate refused in the first handshake (another CA's naming merchant A) would come back
    unverified on the second. The front resumes none (no tickets, no session cache)."""
    directory = pki.directory / "resume"
    directory.mkdir(exist_ok=True)
    certificate, key = pki.a_from_other_ca.write(directory, "other")
    context = ssl.create_default_context(cadata=pki.ca.certificate_pem.decode())
    context.load_cert_chain(certificate, key)
    context.set_alpn_protocols(["h2"])
    session = None
    for attempt in range(2):
        with (
            socket.create_connection(("127.0.0.1", tls_harness.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            assert tls.selected_alpn_protocol() == "h2"
            # the HTTP/2 preface and SETTINGS: the gRPC server answers, and TLS 1.3 tickets (if
            # any were sent) are read with its answer
            tls.sendall(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
            )
            assert tls.recv(9)
            assert not tls.session_reused, attempt
            session = tls.session


def test_a_port_of_a_closed_connection_is_not_taken_again_at_once() -> None:
    """A call of a closed connection, still queued, must not be judged as the next connection
    on the same local port: the port rests for PORT_QUARANTINE_SECONDS (the front then connects
    again from another)."""
    peers = tls_front.Peers()
    refused = tls_front.Peer(refusal="no client certificate")
    assert peers.take(40_000, refused)
    assert not peers.take(40_000, tls_front.Peer())  # in use
    assert peers.of("ipv4:127.0.0.1:40000") is refused
    peers.release(40_000)
    assert peers.of("ipv4:127.0.0.1:40000") is None
    assert not peers.take(40_000, tls_front.Peer())  # resting
    assert peers.take(40_001, tls_front.Peer())
    assert peers.of("ipv6:[::1]:40001") is None  # only the private IPv4 listener's peers


def test_the_front_connects_from_no_resting_port(
    pki: Pki, tls_harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """With every local port resting the front gives up on the client (after its attempts,
    each refused before a byte was forwarded); once they rest no more, it serves again."""
    front = tls_harness.app.front
    assert front is not None
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    request = registry_pb2.GetParticipantRequest(participant_id="nobody")
    resting = dict.fromkeys(range(low, high + 1), time.monotonic())
    tls_harness.run(_set_released(front.peers, resting))
    try:
        with pki.channel(tls_harness.port, pki.operator) as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            call = partial(registry.GetParticipant, request, metadata=ADMIN, timeout=3)
            assert code_of(call) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "no free local port" in caplog.text
    finally:
        tls_harness.run(_set_released(front.peers, {}))
    with pki.channel(tls_harness.port, pki.operator) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        call = partial(registry.GetParticipant, request, metadata=ADMIN, timeout=5)
        assert code_of(call) == grpc.StatusCode.NOT_FOUND


async def _set_released(peers: tls_front.Peers, released: dict[int, float]) -> None:
    peers.released = released  # on the server's loop, as the front uses it


def test_the_private_port_behind_the_front_serves_nobody_directly(tls_harness: Harness) -> None:
    """The gRPC server listens on a loopback port of its own behind the front: a connection made
    to it directly (not through the front) is not known, so not served, whatever its token."""
    private = tls_harness.app.private_port
    assert private and private != tls_harness.port
    with grpc.insecure_channel(f"127.0.0.1:{private}") as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        request = registry_pb2.GetParticipantRequest(participant_id="nobody")
        with pytest.raises(grpc.RpcError) as refused:
            registry.GetParticipant(request, metadata=ADMIN, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "did not come through" in (refused.value.details() or "")


def test_the_handshake_check_refuses_in_the_handshake(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK=handshake: gRPC's own TLS. A client without a
    good certificate is refused in the handshake and sees UNAVAILABLE; one with a merchant's
    certificate is served as that merchant."""
    running = mutual_tls_harness(
        pki.directory,
        tmp_path_factory.mktemp("tls-handshake"),
        tls_client_certificate_check="handshake",
    )
    try:
        assert running.app.front is None
        request = authorization_pb2.GetAuthorizationRequest(authorization_id="0" * 32)
        for client, expected in (
            (None, grpc.StatusCode.UNAVAILABLE),
            (pki.a_from_other_ca, grpc.StatusCode.UNAVAILABLE),
            (pki.a_expired, grpc.StatusCode.UNAVAILABLE),
            (pki.a, grpc.StatusCode.NOT_FOUND),  # served as merchant A: no such id
        ):
            with pki.channel(running.port, client) as channel:
                engine = authorization_pb2_grpc.AuthorizationServiceStub(channel)
                assert code_of(partial(engine.GetAuthorization, request, timeout=5)) == expected
    finally:
        running.close()


def test_plaintext_is_not_served(tls_harness: Harness) -> None:
    with grpc.insecure_channel(tls_harness.address) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        request = registry_pb2.GetParticipantRequest(participant_id="nobody")
        assert code_of(lambda: registry.GetParticipant(request, metadata=ADMIN, timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_a_revoked_token_is_unauthenticated_without_a_restart(
    operator: grpc.Channel, tls_harness: Harness
) -> None:
    registry = registry_pb2_grpc.RegistryServiceStub(operator)
    request = registry_pb2.GetParticipantRequest(participant_id="nobody-at-all")
    revocable = bearer("test-revocable-admin")
    assert code_of(lambda: registry.GetParticipant(request, metadata=revocable, timeout=5)) == (
        grpc.StatusCode.NOT_FOUND
    )
    tokens_file = Path(tls_harness.settings.tokens_file)
    assert b"test-revocable-admin" not in tokens_file.read_bytes()  # stored hashed
    token_id = next(
        entry.token_id
        for hashed, entry in tokens.read(tokens_file).items()
        if hashed == tokens.digest("test-revocable-admin")
    )
    assert tokens.revoke(tokens_file, token_id)
    deadline = time.monotonic() + 5
    code = grpc.StatusCode.NOT_FOUND
    while code != grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline:
        time.sleep(0.2)
        code = code_of(lambda: registry.GetParticipant(request, metadata=revocable, timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # the others still work, and a token added now works at once (within the check interval)
    assert code_of(lambda: registry.GetParticipant(request, metadata=ADMIN, timeout=5)) == (
        grpc.StatusCode.NOT_FOUND
    )
    _, added = tokens.add(tokens_file, "admin", None, None)
    deadline = time.monotonic() + 5
    while code != grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline:
        time.sleep(0.2)
        code = code_of(lambda: registry.GetParticipant(request, metadata=bearer(added), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    assert added not in json.dumps(json.loads(tokens_file.read_text()))


def test_a_rotated_server_certificate_is_picked_up_while_calls_go_on(
    pki: Pki, tls_harness: Harness, operator: grpc.Channel
) -> None:
    """The server's certificate is replaced on disk by one from a new CA: an open connection
    goes on answering throughout, and a new client trusting only the new CA gets through."""
    registry = registry_pb2_grpc.RegistryServiceStub(operator)
    request = registry_pb2.GetParticipantRequest(participant_id="nobody-at-all")
    outcomes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            outcomes.append(code_of(lambda: registry.GetParticipant(request, metadata=ADMIN)))

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        new_ca = make_ca("rotated CA")
        rotated = issue(new_ca, "localhost", server_names=("localhost", "127.0.0.1"))
        # the key first, then the certificate: in between the pair does not match and the old
        # one stays
        (pki.directory / "server.key").write_bytes(rotated.key_pem)
        time.sleep(1.2)
        (pki.directory / "server.crt").write_bytes(rotated.certificate_pem)
        deadline = time.monotonic() + 10
        code = grpc.StatusCode.UNAVAILABLE
        while code != grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline:
            time.sleep(0.3)
            with pki.channel(tls_harness.port, pki.operator, trust=new_ca) as fresh:
                stub = registry_pb2_grpc.RegistryServiceStub(fresh)
                code = code_of(partial(stub.GetParticipant, request, metadata=ADMIN, timeout=3))
        assert code == grpc.StatusCode.NOT_FOUND  # served with the rotated certificate
    finally:
        stop.set()
        caller.join(10)
    assert outcomes and set(outcomes) == {grpc.StatusCode.NOT_FOUND}, set(outcomes)
    assert tls_harness.app.certificates is not None
    assert tls_harness.app.certificates.reloads >= 1


def test_the_common_name_can_be_the_stated_field(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """MEDWALLET_CLIENT_IDENTITY_FIELD=common_name: the subject CN names the merchant; a URI SAN
    alone then names none (the certificate is an operator's: a token is needed)."""
    directory = tmp_path_factory.mktemp("tls-cn")
    ca = make_ca()
    (directory / "ca.crt").write_bytes(ca.certificate_pem)
    issue(ca, "localhost", server_names=("localhost", "127.0.0.1")).write(directory, "server")
    by_name = issue(ca, f"medwallet:merchant:{MERCHANT_A}")
    by_uri = issue(ca, "someone", merchant_id=MERCHANT_A)
    running = mutual_tls_harness(
        directory,
        directory,
        client_identity_field="common_name",
    )
    try:
        request = authorization_pb2.GetAuthorizationRequest(authorization_id="0" * 32)
        for client, expected in (
            (by_name, grpc.StatusCode.NOT_FOUND),  # served as the merchant: no such id
            (by_uri, grpc.StatusCode.UNAUTHENTICATED),  # no merchant named, no token
        ):
            with pki.channel(running.port, client, trust=ca) as channel:
                engine = authorization_pb2_grpc.AuthorizationServiceStub(channel)
                assert code_of(partial(engine.GetAuthorization, request, timeout=10)) == expected
    finally:
        running.close()
