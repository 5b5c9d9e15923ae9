"""The auto-pipelining Redis connection of the hot path (storage/redis/pipelined.py), against a
real redis-server: replies reach their own callers, error replies stay with their command,
scripts come back after SCRIPT FLUSH or a restart, and every failure (lost connection, timeout,
too many commands in flight, Redis down) is an error the service answers UNAVAILABLE, after
which the next call works again without restarting anything."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from authz_server.domain.errors import Unavailable
from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.generated.medwallet.v1 import authorization_pb2_grpc
from authz_server.runtime.embedded_redis import EmbeddedRedis, redis_server_binary
from authz_server.server.app import Application
from authz_server.storage.redis.pipelined import (
    PipelinedRedis,
    RedisAddress,
    Reply,
    Script,
    TooManyPendingCommands,
)
from authz_server.storage.redis.quota_cache import guarded
from tests.harness import Harness
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    authorize,
    authorize_request,
    capture,
    family,
    figures,
    refused,
    register_merchants,
)

pytestmark = pytest.mark.backend_neutral

T = TypeVar("T")

ECHO = Script("return {KEYS[1], ARGV[1]}")


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("pipelined") / "redis", persistent=False)
    yield server.start()
    server.stop()


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


# The tests of reply matching and failures run on both loops the server may run on.
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def run(
    url: str,
    body: Callable[[PipelinedRedis], Awaitable[T]],
    timeout_seconds: float = 2.0,
    pending_limit: int = 10_000,
    loop: str = "asyncio",
) -> T:
    """Runs `body` with a fresh client on a fresh event loop, and closes the client after."""

    async def main() -> T:
        client = PipelinedRedis.from_url(
            url, timeout_seconds=timeout_seconds, pending_limit=pending_limit
        )
        try:
            return await body(client)
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main())


def admin(url: str) -> redis.Redis:
    """A plain redis-py connection for checks, named so it can be told from the client's."""
    return redis.Redis.from_url(url, client_name="test-admin")


# --- replies and errors ------------------------------------------------------------------------


@LOOPS
def test_replies_go_to_their_own_callers_under_heavy_concurrency(redis_url: str, loop: str) -> None:
    """5,000 concurrent callers, five kinds of call mixed, each checking its own replies: a
    reply matched to the wrong caller would fail one of them."""
    callers = 5_000
    run_id = uuid.uuid4().hex

    async def one(client: PipelinedRedis, number: int) -> None:
        await asyncio.sleep(random.random() / 100)  # spread over many loop iterations
        kind = number % 5
        key = f"concurrent:{run_id}:{number}"
        if kind == 0:
            assert await client.execute("SET", key, number) == b"OK"
            assert await client.execute("GET", key) == str(number).encode()
        elif kind == 1:
            assert await client.execute("INCRBY", key, number) == number
            assert await client.execute("INCRBY", key, 1) == number + 1
        elif kind == 2:
            assert await client.evalsha(ECHO, [key], [number]) == [key.encode(), b"%d" % number]
        elif kind == 3:
            replies = await client.execute_many(
                [
                    ("SET", key, number),
                    ("INCR", key),
                    ("HSET", key, "field", 1),  # a string, not a hash: an error in place
                    ("GET", key),
                ]
            )
            assert replies[:2] == [b"OK", number + 1]
            assert isinstance(replies[2], ResponseError) and "WRONGTYPE" in str(replies[2])
            assert replies[3] == str(number + 1).encode()
        else:
            await client.execute("SET", key, f"text {number}")
            with pytest.raises(ResponseError, match="not an integer"):
                await client.execute("INCR", key)
            assert await client.execute("GET", key) == f"text {number}".encode()

    async def body(client: PipelinedRedis) -> tuple[int, list[str]]:
        await client.execute("PING")
        await asyncio.gather(*(one(client, number) for number in range(callers)))
        with admin(redis_url) as checking:
            names = [entry["name"] for entry in checking.client_list()]
        return client.pending_commands, names

    pending, names = run(redis_url, body, loop=loop)
    assert pending == 0
    assert names.count("") == 1  # one connection carried them all (the other one is named)


def test_error_replies_come_back_in_place_and_the_connection_stays_usable(
    redis_url: str,
) -> None:
    async def body(client: PipelinedRedis) -> list[Reply]:
        replies = await client.execute_many(
            [
                ("SET", "errors:text", "x"),
                ("INCR", "errors:text"),
                ("NO-SUCH-COMMAND",),
                ("EVALSHA", "0" * 40, 0),
                ("GET", "errors:text"),
            ]
        )
        with pytest.raises(ResponseError, match="unknown command"):
            await client.execute("NO-SUCH-COMMAND")
        replies.append(await client.execute("GET", "errors:text"))
        return replies

    replies = run(redis_url, body)
    assert replies[0] == b"OK"
    assert type(replies[1]) is ResponseError and "not an integer" in str(replies[1])
    assert type(replies[2]) is ResponseError and "unknown command" in str(replies[2])
    assert isinstance(replies[3], NoScriptError)
    assert replies[4:] == [b"x", b"x"]


def test_evalsha_loads_a_script_redis_lost(redis_url: str) -> None:
    script = Script("return 'flushed ' .. ARGV[1]")

    async def body(client: PipelinedRedis) -> list[Reply]:
        first = await client.evalsha(script, [], [1])
        await client.execute("SCRIPT", "FLUSH")
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
        again = await client.evalsha(script, [], [2])
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
        return [first, again]

    assert run(redis_url, body) == [b"flushed 1", b"flushed 2"]


def test_script_sha_is_the_one_redis_computes(redis_url: str) -> None:
    script = Script("return 'sha'")
    assert admin(redis_url).script_load(script.source) == script.sha


# --- failures ----------------------------------------------------------------------------------


@LOOPS
def test_a_lost_connection_fails_what_is_in_flight_and_the_next_call_reconnects(
    redis_url: str, loop: str
) -> None:
    async def body(client: PipelinedRedis) -> None:
        first_id = await client.execute("CLIENT", "ID")
        # BLPOP holds the connection; the GET waits behind it.
        blocked = asyncio.ensure_future(client.execute("BLPOP", "lost:nothing", 5))
        behind = asyncio.ensure_future(client.execute("GET", "lost:key"))
        await asyncio.sleep(0.1)
        assert client.pending_commands == 2
        await asyncio.to_thread(admin(redis_url).client_kill_filter, _id=str(first_id))
        for call in (blocked, behind):
            with pytest.raises(RedisConnectionError):
                await call
        with pytest.raises(Unavailable):  # what the service answers
            await guarded(lambda: client.execute("BLPOP", "lost:nothing", 0))
        assert client.pending_commands == 0
        assert await client.execute("CLIENT", "ID") != first_id

    run(redis_url, body, timeout_seconds=10, loop=loop)


@LOOPS
def test_a_timeout_fails_the_call_and_drops_the_connection(redis_url: str, loop: str) -> None:
    """Past the timeout the connection is closed: a late reply would otherwise be taken for the
    answer of the next command."""

    async def body(client: PipelinedRedis) -> None:
        first_id = await client.execute("CLIENT", "ID")
        started = time.monotonic()
        slow = asyncio.ensure_future(client.execute("BLPOP", "timeout:nothing", 2))
        behind = asyncio.ensure_future(client.execute("SET", "timeout:key", "value"))
        with pytest.raises(TimeoutError):
            await slow
        # not before the timeout, and before BLPOP's own 2 s answer: the timeout ended it (an
        # upper bound of 1 s was a speed check a loaded machine could fail)
        assert 0.25 <= time.monotonic() - started < 2.0
        with pytest.raises(RedisConnectionError):
            await behind
        assert client.pending_commands == 0
        # A new connection, and its replies are its own.
        assert await client.execute("CLIENT", "ID") != first_id
        assert await client.execute("ECHO", "after") == b"after"
        await asyncio.sleep(2)  # the BLPOP would have answered by now: it must not show up
        assert await client.execute("ECHO", "later") == b"later"
        with pytest.raises(Unavailable):
            await guarded(lambda: client.execute("BLPOP", "timeout:nothing", 2))
        clients = await asyncio.to_thread(admin(redis_url).client_list)
        assert first_id not in [int(entry["id"]) for entry in clients]

    run(redis_url, body, timeout_seconds=0.3, loop=loop)


@LOOPS
@pytest.mark.parametrize("busy", ["before the write", "after the write"])
def test_a_loop_busy_past_the_timeout_is_not_redis_failing_to_answer(
    redis_url: str, loop: str, busy: str
) -> None:
    """The loop kept busy (a callback that does not yield, a thread holding the interpreter)
    for longer than the timeout, right after a call: before its command was written, Redis's time
    has not begun; after, its reply came meanwhile and is read. Neither is a timeout. (Before the
    write failed on both loops while the deadline ran from the queueing, and on uvloop too while
    a due timer, which it runs before call_soon's callbacks, could end the call before its write:
    a likely cause of the one Redis "timeout" CI saw in test_settle_due_bound.) A Redis that does
    not answer still times out (the test above)."""

    async def body(client: PipelinedRedis) -> None:
        await client.execute("PING")  # connected
        if busy == "before the write":
            call = asyncio.ensure_future(client.execute("ECHO", "waited"))
            await asyncio.sleep(0)  # the call has run and queued its command: nothing written
            time.sleep(0.6)
            assert await call == b"waited"
        else:
            # BLPOP answers (nil) 0.1 s after it is read: during the busy loop, once written.
            call = asyncio.ensure_future(client.execute("BLPOP", "busy:nothing", 0.1))
            await asyncio.sleep(0.02)  # written
            time.sleep(0.6)
            assert await call is None
        assert await client.execute("ECHO", "after") == b"after"

    run(redis_url, body, timeout_seconds=0.3, loop=loop)


@LOOPS
def test_the_pending_bound_fails_calls_beyond_it_at_once(redis_url: str, loop: str) -> None:
    async def body(client: PipelinedRedis) -> None:
        await client.execute("PING")  # connected
        # Eleven calls in one loop iteration: none can have been answered before the last.
        results = await asyncio.gather(
            *(client.execute("ECHO", number) for number in range(11)), return_exceptions=True
        )
        assert results[:10] == [b"%d" % number for number in range(10)]
        assert isinstance(results[10], TooManyPendingCommands)
        with pytest.raises(TooManyPendingCommands):  # a batch bigger than the bound
            await client.execute_many([("ECHO", number) for number in range(11)])
        assert await client.execute_many([("ECHO", number) for number in range(10)]) == [
            b"%d" % number for number in range(10)
        ]
        # The service answers UNAVAILABLE.
        blocked = [asyncio.ensure_future(client.execute("ECHO", n)) for n in range(10)]
        await asyncio.sleep(0)  # they are queued, not answered yet
        assert client.pending_commands == 10
        with pytest.raises(Unavailable):
            await guarded(lambda: client.execute("PING"))
        await asyncio.gather(*blocked)
        assert client.pending_commands == 0

    run(redis_url, body, pending_limit=10, loop=loop)


def test_redis_down_then_back_without_a_new_client(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = server.start()

    async def body(client: PipelinedRedis) -> None:
        assert await client.execute("SET", "down:key", 1) == b"OK"
        await asyncio.to_thread(server.stop)
        for _ in range(3):  # the lost connection, then refused connects
            with pytest.raises(Unavailable):
                await guarded(lambda: client.execute("GET", "down:key"))
        await asyncio.to_thread(server.start)
        assert await client.execute("SET", "down:key", 2) == b"OK"
        assert await client.evalsha(ECHO, ["k"], [1]) == [b"k", b"1"]  # the script again

    try:
        run(url, body)
    finally:
        server.stop()


def test_login_and_database_come_from_the_url(tmp_path: Path) -> None:
    socket = tmp_path / "redis.sock"
    arguments = [
        redis_server_binary(),
        "--port", "0", "--unixsocket", str(socket), "--save", "", "--appendonly", "no",
        "--requirepass", "secret", "--dir", str(tmp_path),
    ]  # fmt: skip
    process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        url = f"unix://:secret@{socket}?db=3"
        deadline = time.monotonic() + 10
        while not os.path.exists(socket):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        time.sleep(0.1)

        async def body(client: PipelinedRedis) -> None:
            assert await client.execute("SET", "login:key", "in three") == b"OK"

        run(url, body)
        assert redis.Redis.from_url(url).get("login:key") == b"in three"
        assert redis.Redis.from_url(f"unix://:secret@{socket}?db=0").get("login:key") is None

        async def refused_login(client: PipelinedRedis) -> None:
            with pytest.raises(RedisConnectionError, match="AUTH"):
                await client.execute("PING")

        run(f"unix://:wrong@{socket}", refused_login)
    finally:
        process.terminate()
        process.wait(5)


def test_close_answers_what_is_in_flight_then_refuses(redis_url: str) -> None:
    async def main() -> None:
        client = PipelinedRedis.from_url(redis_url, timeout_seconds=2)
        await client.execute("PING")
        calls = [asyncio.ensure_future(client.execute("ECHO", n)) for n in range(100)]
        await asyncio.sleep(0)  # queued, not written yet
        await client.aclose()
        assert await asyncio.gather(*calls) == [b"%d" % n for n in range(100)]
        with pytest.raises(RedisConnectionError):
            await client.execute("PING")
        # Calls still waiting for a connection when it closes fail (and are not cancelled).
        connecting = PipelinedRedis.from_url(redis_url, timeout_seconds=2)
        waiting = [asyncio.ensure_future(connecting.execute("ECHO", n)) for n in range(3)]
        await asyncio.sleep(0)
        await connecting.aclose()
        for call in waiting:
            with pytest.raises(RedisConnectionError):
                await call

    asyncio.run(main())


def test_addresses_are_parsed_as_redis_py_parses_them() -> None:
    assert RedisAddress.from_url("redis://cache.internal:6380/2") == RedisAddress(
        host="cache.internal", port=6380, database=2
    )
    assert RedisAddress.from_url("redis://:pw@localhost") == RedisAddress(password="pw")
    assert RedisAddress.from_url("redis://user:pw@h/1").login_commands() == [
        ("AUTH", "user", "pw"),
        ("SELECT", 1),
    ]
    assert RedisAddress.from_url("unix:///run/redis.sock?db=4") == RedisAddress(
        unix_socket_path="/run/redis.sock", database=4
    )
    assert RedisAddress.from_url("redis://localhost").login_commands() == []
    with pytest.raises(ValueError, match="TLS"):
        RedisAddress.from_url("rediss://localhost")


# --- the service -------------------------------------------------------------------------------


def test_the_service_reloads_its_scripts_after_script_flush(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    harness.run(harness.client.script_flush())
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    assert held.decision == APPROVED
    harness.run(harness.client.script_flush())
    assert capture(authorizations, HOSPITAL, held.authorization_id).status == CAPTURED
    assert figures(relationships, rid) == (40_000, 0, 10_000)


async def _persist(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.bgrewriteaof()
        for _ in range(200):
            info = await client.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                return
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    raise AssertionError("the append-only file was not rewritten within 10 s")


async def _application(harness: Harness, redis_url: str) -> Application:
    return Application(replace(harness.settings, grpc_port=0), redis_url, clock=harness.clock)


def test_the_service_answers_unavailable_while_redis_is_down_and_recovers_by_itself(
    harness: Harness, registry: Any, relationships: Any, tmp_path: Path
) -> None:
    """Redis killed: UNAVAILABLE at once, not a hang. Redis back (another process, with its
    append-only file): the same server rebuilds the hot state from SQL by itself and answers
    again; the hold approved before survives and is captured."""
    fam = family(registry, relationships, 50_000)
    server = EmbeddedRedis(tmp_path / "redis", persistent=True)
    server_url = server.start()
    app = harness.run(_application(harness, server_url))
    port = harness.run(app.start())  # its start-up reconcile loads the family's quota
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = authorization_pb2_grpc.AuthorizationServiceStub(channel)
    try:
        held = stub.Authorize(
            authorize_request(fam.beneficiary_id, MEDICAL, 10_000), metadata=HOSPITAL
        )
        assert held.decision == APPROVED
        # appendfsync everysec may hold the hold's write back for a moment (more so on a loaded
        # machine): rewrite the append-only file and wait, so the kill below loses nothing.
        harness.run(_persist(server_url))
        assert server.process is not None
        server.process.kill()
        server.process.wait(5)
        for _ in range(2):  # the lost connection, then a refused connect
            started = time.monotonic()
            refused(
                lambda: stub.Authorize(
                    authorize_request(fam.beneficiary_id, MEDICAL, 5_000), metadata=HOSPITAL
                ),
                grpc.StatusCode.UNAVAILABLE,
                "UNAVAILABLE",
            )
            assert time.monotonic() - started < 2.0
        server.start()
        # Another Redis process answers now: the server rebuilds the hot state from SQL (its
        # file may miss the last second) and answers UNAVAILABLE meanwhile, never a decline.
        request = authorize_request(fam.beneficiary_id, MEDICAL, 5_000)
        deadline = time.monotonic() + 30
        while True:
            try:
                again = stub.Authorize(request, metadata=HOSPITAL)
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                assert time.monotonic() < deadline, "not serving again in time"
                time.sleep(0.1)
        assert (again.decision, again.remaining_quota_fen) == (APPROVED, 35_000)
        captured = stub.Capture(
            pb.CaptureRequest(authorization_id=held.authorization_id, idempotency_key="c"),
            metadata=HOSPITAL,
        )
        assert captured.authorization.status == pb.AUTHORIZATION_STATUS_CAPTURED
    finally:
        channel.close()
        harness.run(app.stop(0))
        server.stop()
