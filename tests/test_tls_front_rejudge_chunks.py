"""The TLS front judging its open connections again when the client CA file changes, without
holding the event loop (server/tls_front.py rejudge_pass, Peers.current): the pass goes
`rejudge_chunk` connections at a time and lets the loop go between, and a call on a connection
the pass has not reached yet is judged before it is served, so a CA taken out of the file
vouches for no call from the moment the front sees the change."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2_grpc
from authz_server.runtime.certificates import make_ca
from authz_server.server.tls_front import NO_LONGER_TRUSTED, TlsFront
from tests.harness import Harness
from tests.test_tls import Pki, mutual_tls_harness
from tests.test_tls_front_audit import GET, SERVED, get_code

pytestmark = pytest.mark.backend_neutral

CONNECTIONS = 300
CHUNK = 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("rejudge-chunks-pki"))
    (pki.directory / "ca.crt").write_bytes(both_cas(pki))
    return pki


def both_cas(pki: Pki) -> bytes:
    return pki.ca.certificate_pem + pki.other_ca.certificate_pem


@pytest.fixture(scope="module")
def service(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    running = mutual_tls_harness(pki.directory, tmp_path_factory.mktemp("rejudge-chunks"))
    yield running
    running.close()


def the_front(service: Harness) -> TlsFront:
    front = service.app.front
    assert front is not None
    return front


def wait_taken(front: TlsFront, contents: bytes) -> None:
    """Until the front has taken the client CA file with `contents` (its watcher, ~1 s)."""
    deadline = time.monotonic() + 10
    while front.client_ca != contents:
        assert time.monotonic() < deadline, "the front did not take the client CA file"
        time.sleep(0.05)


@pytest.fixture
def both_trusted_after(pki: Pki, service: Harness) -> Iterator[None]:
    """Both CAs trusted again after the test (the module's state for the next one)."""
    yield
    (pki.directory / "ca.crt").write_bytes(both_cas(pki))
    wait_taken(the_front(service), both_cas(pki))


def test_a_call_on_a_connection_not_judged_again_yet_is_judged_before_it_is_served(
    pki: Pki, service: Harness, monkeypatch: pytest.MonkeyPatch, both_trusted_after: None
) -> None:
    """The pass is held before it judges anything: a call on a connection of the removed CA is
    refused all the same (judged on demand), one of the CA kept is served."""
    front = the_front(service)
    started = threading.Event()

    async def held_pass() -> None:
        started.set()
        await asyncio.Event().wait()  # never reaches a connection

    monkeypatch.setattr(front, "rejudge_pass", held_pass)
    with (
        pki.channel(service.port, pki.a_from_other_ca) as removed,
        pki.channel(service.port, pki.a) as kept,
    ):
        try:
            assert get_code(removed) == SERVED and get_code(kept) == SERVED
            (pki.directory / "ca.crt").write_bytes(pki.ca.certificate_pem)
            wait_taken(front, pki.ca.certificate_pem)
            assert started.wait(5)
            assert get_code(removed) == grpc.StatusCode.UNAUTHENTICATED
            assert get_code(kept) == SERVED
        finally:
            # the held pass ended, before the file is put back: that change gets a real one
            monkeypatch.undo()
            service.run(_cancel(front))


async def _cancel(front: TlsFront) -> None:
    if front.rejudging is not None:
        front.rejudging.cancel()
        await asyncio.gather(front.rejudging, return_exceptions=True)


def _codes(channels: list[grpc.Channel]) -> list[grpc.StatusCode]:
    """One GetAuthorization on each channel, all at once. A connection that could not be made
    at once is tried again until the deadline (wait_for_ready): 300 handshakes at once on two
    loaded cores had one answered UNAVAILABLE (a CI rehearsal), and connecting is not what
    these tests judge."""
    futures = [
        authorization_pb2_grpc.AuthorizationServiceStub(channel).GetAuthorization.future(
            GET, timeout=30, wait_for_ready=True
        )
        for channel in channels
    ]
    codes = []
    for future in futures:
        try:
            future.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
    return codes


def test_many_open_connections_are_judged_again_in_chunks_the_loop_going_on(
    pki: Pki, service: Harness, monkeypatch: pytest.MonkeyPatch, both_trusted_after: None
) -> None:
    front = the_front(service)
    monkeypatch.setattr(front, "rejudge_chunk", CHUNK)
    monkeypatch.setattr(front, "refused_seconds", 120.0)  # refused ones still open to call
    # a connection of its own for each channel (no subchannel shared between channels)
    options = [("grpc.use_local_subchannel_pool", 1)]
    issued = [pki.a if i % 2 else pki.a_from_other_ca for i in range(CONNECTIONS)]
    channels = [
        grpc.secure_channel(
            f"localhost:{service.port}",
            grpc.ssl_channel_credentials(
                pki.ca.certificate_pem, client.key_pem, client.certificate_pem
            ),
            options=options,
        )
        for client in issued
    ]
    try:
        assert _codes(channels) == [SERVED] * CONNECTIONS
        assert len(front.connections) >= CONNECTIONS

        def judged_now() -> int:
            generation = front.peers.generation
            return sum(peer.generation == generation for peer in front.peers.by_port.values())

        async def change() -> tuple[int, int, int, int]:
            """The other CA out of the file, and the pass watched from the loop: a task that
            only yields counts how often it ran while the pass did, and the most connections
            judged between two of its turns (one chunk at most: the loop let go after each)."""
            (pki.directory / "ca.crt").write_bytes(pki.ca.certificate_pem)
            front.certificates.checked = 0.0
            front.current_context()
            task = front.rejudging
            assert task is not None and not task.done()
            ticks = 0
            most = 0
            before = judged_now()
            while not task.done():
                ticks += 1
                await asyncio.sleep(0)
                after = judged_now()
                most = max(most, after - before)
                before = after
            await task
            # all judged by the pass itself (not yet by a call)
            peers = list(front.peers.by_port.values())
            behind = sum(peer.generation != front.peers.generation for peer in peers)
            refused = sum(peer.refusal == NO_LONGER_TRUSTED for peer in peers)
            return ticks, most, behind, refused

        ticks, most, behind, refused = service.run(change())
        # the loop went on between chunks, not once around a pass that judged all at once
        assert ticks >= CONNECTIONS // CHUNK
        assert 0 < most <= CHUNK
        assert behind == 0
        assert refused == CONNECTIONS // 2
        expected = [
            SERVED if client is pki.a else grpc.StatusCode.UNAUTHENTICATED for client in issued
        ]
        assert _codes(channels) == expected
    finally:
        for channel in channels:
            channel.close()


def test_a_second_change_during_a_pass_starts_it_over_with_the_newest_cas(
    pki: Pki, service: Harness, monkeypatch: pytest.MonkeyPatch, both_trusted_after: None
) -> None:
    """Never two passes at once: a change while one runs makes that one start over, and the
    connections end judged by the newest file (a third CA alone: neither is trusted, whichever
    the first pass reached)."""
    front = the_front(service)
    monkeypatch.setattr(front, "rejudge_chunk", 1)
    with (
        pki.channel(service.port, pki.a_from_other_ca) as other,
        pki.channel(service.port, pki.a) as own,
    ):
        assert get_code(other) == SERVED and get_code(own) == SERVED

        async def two_changes() -> tuple[bool, int]:
            (pki.directory / "ca.crt").write_bytes(pki.ca.certificate_pem)
            front.certificates.checked = 0.0
            front.current_context()
            first = front.rejudging
            assert first is not None
            await asyncio.sleep(0)  # the first chunk judged
            (pki.directory / "ca.crt").write_bytes(make_ca("a third CA").certificate_pem)
            front.certificates.checked = 0.0
            front.current_context()
            same = front.rejudging is first
            await first
            peers = list(front.peers.by_port.values())
            assert all(peer.generation == front.peers.generation for peer in peers)
            return same, sum(peer.refusal == NO_LONGER_TRUSTED for peer in peers)

        same, refused = service.run(two_changes())
        assert same  # the running pass took the second change over
        assert refused == 2
        assert get_code(other) == grpc.StatusCode.UNAUTHENTICATED
        assert get_code(own) == grpc.StatusCode.UNAUTHENTICATED
