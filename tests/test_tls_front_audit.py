"""Security audit of the service's TLS front (server/tls_front.py): who a call is served as,
what a refused or stale certificate can still do, and what an unauthenticated client can hold.
Real certificates, the real service (tests/harness.py), as tests/test_tls.py does."""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from OpenSSL import SSL

from authz_server.generated.medwallet.v1 import authorization_pb2, authorization_pb2_grpc
from authz_server.runtime.certificates import MERCHANT_URI_PREFIX, Issued, issue
from authz_server.server import tls_front
from authz_server.server.auth import Unauthenticated
from authz_server.server.tls import certificate_merchant
from tests.harness import Harness
from tests.test_tls import MERCHANT_A, Pki, code_of, mutual_tls_harness

pytestmark = pytest.mark.backend_neutral

DAY = datetime.timedelta(days=1)
GET = authorization_pb2.GetAuthorizationRequest(authorization_id="0" * 32)
# GetAuthorization of an id nobody has: NOT_FOUND means "served as a merchant"
SERVED = grpc.StatusCode.NOT_FOUND


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def sub_ca(ca: Issued, name: str, merchant_id: str | None = None) -> Issued:
    """A CA certificate signed by `ca` (optionally naming a merchant, to be used as a leaf)."""
    return issue(ca, name, merchant_id=merchant_id, is_ca=True, days=30)


def leaf(ca: Issued, uris: list[str], common_name: str = "someone") -> Issued:
    return issue(ca, common_name, uris=tuple(uris), days=30)


def channel_with_chain(pki: Pki, port: int, issued: Issued, extra: list[Issued]) -> grpc.Channel:
    """A client presenting `issued` and the `extra` certificates after it as its chain."""
    chain = issued.certificate_pem + b"".join(e.certificate_pem for e in extra)
    credentials = grpc.ssl_channel_credentials(pki.ca.certificate_pem, issued.key_pem, chain)
    return grpc.secure_channel(f"localhost:{port}", credentials)


def get_code(channel: grpc.Channel) -> grpc.StatusCode:
    engine = authorization_pb2_grpc.AuthorizationServiceStub(channel)
    return code_of(partial(engine.GetAuthorization, GET, timeout=10))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("audit-pki"))


@pytest.fixture(scope="module")
def front_harness(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    running = mutual_tls_harness(
        pki.directory,
        tmp_path_factory.mktemp("audit-tls-service"),
    )
    yield running
    running.close()


# (1) who a certificate is served as


def test_a_chain_through_an_untrusted_intermediate_is_refused(
    pki: Pki, front_harness: Harness
) -> None:
    """Leaf <- intermediate of another CA (sent in the chain): refused, the error at depth 1
    not overridden by a later OK at depth 0. Leaf <- sub-CA of the trusted CA (whose path
    length is 0): refused too. Another CA's leaf sent with the trusted CA appended: refused."""
    foreign = sub_ca(pki.other_ca, "foreign intermediate")
    via_foreign = leaf(foreign, [MERCHANT_URI_PREFIX + MERCHANT_A])
    with channel_with_chain(pki, front_harness.port, via_foreign, [foreign]) as channel:
        assert get_code(channel) == grpc.StatusCode.UNAUTHENTICATED
    own_sub = sub_ca(pki.ca, "own intermediate")
    via_own_sub = leaf(own_sub, [MERCHANT_URI_PREFIX + MERCHANT_A])
    with channel_with_chain(pki, front_harness.port, via_own_sub, [own_sub]) as channel:
        assert get_code(channel) == grpc.StatusCode.UNAUTHENTICATED
    with channel_with_chain(pki, front_harness.port, pki.a_from_other_ca, [pki.ca]) as channel:
        assert get_code(channel) == grpc.StatusCode.UNAUTHENTICATED


def test_a_ca_certificate_used_as_a_leaf_and_an_empty_merchant_id_are_not_served(
    pki: Pki, front_harness: Harness
) -> None:
    """A CA certificate (signed by the trusted CA, naming merchant A) presented as the client's
    own is not served as A; nor is a certificate naming the empty merchant id."""
    as_leaf = sub_ca(pki.ca, "a sub-CA", merchant_id=MERCHANT_A)
    with pki.channel(front_harness.port, as_leaf) as channel:
        assert get_code(channel) == grpc.StatusCode.UNAUTHENTICATED
    with pki.channel(front_harness.port, leaf(pki.ca, [MERCHANT_URI_PREFIX])) as channel:
        assert get_code(channel) == grpc.StatusCode.UNAUTHENTICATED


def test_a_certificate_naming_two_merchants_or_a_lookalike_prefix_is_no_merchant(
    pki: Pki, front_harness: Harness
) -> None:
    """Two merchant URI SANs: refused. A prefix in other case, or with a space before it, or a
    CN naming a merchant under identity field uri_san: names no merchant (an operator's
    certificate; without a token, UNAUTHENTICATED)."""
    two = leaf(pki.ca, [MERCHANT_URI_PREFIX + MERCHANT_A, MERCHANT_URI_PREFIX + "tls-merchant-b"])
    with pytest.raises(Unauthenticated):
        certificate_merchant(two.certificate, "uri_san")
    for odd in ("", " " + MERCHANT_A, MERCHANT_A + "\n", "a b"):
        with pytest.raises(Unauthenticated):
            certificate_merchant(leaf(pki.ca, [MERCHANT_URI_PREFIX + odd]).certificate, "uri_san")
    for uris, common_name in (
        (["MEDWALLET:merchant:" + MERCHANT_A], "x"),
        ([" " + MERCHANT_URI_PREFIX + MERCHANT_A], "x"),
        ([], MERCHANT_URI_PREFIX + MERCHANT_A),
    ):
        lookalike = leaf(pki.ca, uris, common_name)
        assert certificate_merchant(lookalike.certificate, "uri_san") is None
    with pki.channel(front_harness.port, two) as channel:
        assert get_code(channel) == grpc.StatusCode.UNAUTHENTICATED
    with pki.channel(front_harness.port, leaf(pki.ca, [], MERCHANT_URI_PREFIX + MERCHANT_A)) as c:
        assert get_code(c) == grpc.StatusCode.UNAUTHENTICATED


def test_a_refused_client_is_unauthenticated_even_with_a_garbage_body(
    pki: Pki, front_harness: Harness
) -> None:
    """The gate answers before the edge parses: a body that does not parse is not a way to
    learn anything (INVALID_ARGUMENT) without a certificate."""
    with pki.channel(front_harness.port, None) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/medwallet.v1.AuthorizationService/GetAuthorization"
        )
        assert code_of(partial(call, b"\xff" * 64, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_certificate_that_expires_while_its_connection_is_open_stops_being_served(
    pki: Pki, front_harness: Harness
) -> None:
    """The README: every caller presents a certificate 'valid now'. The front judges the
    certificate once, in the handshake; a gRPC channel keeps its connection for hours or days
    (keepalive), so a merchant whose certificate expired went on being served on it."""
    lifetime = 4.0
    start = _now() - DAY + datetime.timedelta(seconds=lifetime)
    short = issue(pki.ca, "a", merchant_id=MERCHANT_A, not_before=start, days=1)
    with pki.channel(front_harness.port, short) as channel:
        assert get_code(channel) == SERVED
        time.sleep(lifetime + 1.5)
        assert get_code(channel) == grpc.StatusCode.UNAUTHENTICATED


# (3) TLS level


def _tls12_context(pki: Pki, certificate: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pki.ca.certificate_pem.decode())
    context.load_cert_chain(certificate, key)
    context.set_alpn_protocols(["h2"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def test_no_tls12_session_is_resumed(pki: Pki, front_harness: Harness) -> None:
    """tests/test_tls.py checks TLS 1.3 tickets; TLS 1.2 session ids (the cache) and tickets
    are refused too."""
    directory = pki.directory / "resume12"
    directory.mkdir(exist_ok=True)
    certificate, key = pki.a_from_other_ca.write(directory, "other")
    context = _tls12_context(pki, certificate, key)
    session = None
    for attempt in range(2):
        with (
            socket.create_connection(("127.0.0.1", front_harness.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            assert tls.version() == "TLSv1.2"
            assert not tls.session_reused, attempt
            session = tls.session


def test_a_tls12_client_cannot_renegotiate(pki: Pki, front_harness: Harness) -> None:
    """A client-initiated renegotiation (which would run a second verification the recorded
    verdict never sees) is refused: the connection fails, nothing more is forwarded."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate(pki.a.certificate)
    context.use_privatekey(pki.a.key)
    context.set_alpn_protos([b"h2"])
    with socket.create_connection(("127.0.0.1", front_harness.port), timeout=5) as raw:
        # blocking (pyOpenSSL answers WantRead on a socket with a timeout), at most 5 s a read
        raw.settimeout(None)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        tls = SSL.Connection(context, raw)
        tls.set_connect_state()
        tls.set_tlsext_host_name(b"localhost")
        tls.do_handshake()
        # the HTTP/2 preface, and the gRPC server's SETTINGS read: nothing is in flight
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        assert tls.recv(9)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 500_000))
        with contextlib.suppress(SSL.Error, OSError):  # the rest, until 0.5 s of silence
            while tls.recv(1024):
                pass
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        assert tls.renegotiate()
        with pytest.raises(SSL.Error) as failed:
            tls.do_handshake()
        assert "no renegotiation" in repr(failed.value), failed.value


# (4) availability


def test_refused_connections_do_not_hold_the_fronts_slots_for_ever(
    pki: Pki, front_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client with no certificate at all completes the handshake (by design) and, once past
    it, held its slot for as long as it kept the connection (a gRPC channel does, with
    keepalive): MAX_CONNECTIONS of them and every merchant was turned away at connect. A
    refused connection is closed a while after its handshake (its calls are answered
    UNAUTHENTICATED until then), so holding slots costs a handshake each time."""
    front = front_harness.app.front
    assert front is not None
    monkeypatch.setattr(front, "refused_seconds", 0.5)
    held = 3
    monkeypatch.setattr(tls_front, "MAX_CONNECTIONS", len(front.connections) + held)
    channels = [pki.channel(front_harness.port, None) for _ in range(held)]
    try:
        for channel in channels:
            assert get_code(channel) == grpc.StatusCode.UNAUTHENTICATED
        time.sleep(1.5)
        with pki.channel(front_harness.port, pki.a) as good:
            assert get_code(good) == SERVED
    finally:
        for channel in channels:
            channel.close()


# (5) hot reload, last: it changes the module's CA


def test_a_removed_ca_stops_serving_connections_already_open(
    pki: Pki, front_harness: Harness
) -> None:
    ca_file = pki.directory / "ca.crt"
    with pki.channel(front_harness.port, pki.a) as old:
        assert get_code(old) == SERVED
        try:
            ca_file.write_bytes(pki.other_ca.certificate_pem)
            # no new connection needed: the front looks at the files by itself and judges the
            # open connections again
            deadline = time.monotonic() + 10
            code = SERVED
            while code == SERVED and time.monotonic() < deadline:
                time.sleep(0.3)
                code = get_code(old)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            with pki.channel(front_harness.port, pki.a) as fresh:
                assert get_code(fresh) == grpc.StatusCode.UNAUTHENTICATED  # the new CA in force
        finally:
            ca_file.write_bytes(pki.ca.certificate_pem)
