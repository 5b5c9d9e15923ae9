"""The limiter frees a call's in-flight slot without a command of its own: the principal's next
admission carries it, or one ZREM per principal within RELEASE_FLUSH_SECONDS; on a real Redis,
under concurrent load, through a FLUSHALL and a restart of the Redis process."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.rate_limiter import (
    MAX_RELEASES_PER_COMMAND,
    RELEASE_FLUSH_SECONDS,
    Limit,
    RedisRateLimiter,
)

pytestmark = pytest.mark.backend_neutral

T = TypeVar("T")
ONE_IN_FLIGHT = Limit(100_000.0, 100_000, 1)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("limiter") / "redis", persistent=False)
    server.start()
    yield server
    server.stop()


def run(url: str, body: Callable[[RedisRateLimiter], Awaitable[T]]) -> T:
    async def main() -> T:
        client = PipelinedRedis.from_url(url, timeout_seconds=1)
        try:
            return await body(RedisRateLimiter(client))
        finally:
            await client.aclose()

    return asyncio.run(main())


def in_flight(url: str, principal_key: str) -> set[bytes]:
    members: list[bytes] = redis.Redis.from_url(url).zrange(  # type: ignore[assignment]
        keys.rate_limit(principal_key)[1], 0, -1
    )
    return set(members)


# Keeps Redis busy for ARGV[1] ms (a script runs alone): commands sent meanwhile wait in its socket.
BUSY = """
local started = redis.call('TIME')
local until_us = started[1] * 1000000 + started[2] + tonumber(ARGV[1]) * 1000
repeat
  local now = redis.call('TIME')
until now[1] * 1000000 + now[2] >= until_us
return 1
"""


def test_a_slot_freed_rides_on_the_next_admission(redis_server: EmbeddedRedis) -> None:
    url = redis_server.url

    async def body(limiter: RedisRateLimiter) -> None:
        first, second = limiter.call_id(), limiter.call_id()
        assert (await limiter.acquire("merchant:rides", ONE_IN_FLIGHT, first)).admitted
        limiter.release("merchant:rides", first)
        assert in_flight(url, "merchant:rides") == {first.encode()}  # nothing sent yet
        # One command: the script forgets `first`, then admits `second` to the one slot.
        assert (await limiter.acquire("merchant:rides", ONE_IN_FLIGHT, second)).admitted
        assert in_flight(url, "merchant:rides") == {second.encode()}
        assert limiter.releasing == {}
        await limiter.stop()

    run(url, body)


def test_a_slot_no_admission_carries_is_freed_within_the_interval(
    redis_server: EmbeddedRedis,
) -> None:
    url = redis_server.url

    async def body(limiter: RedisRateLimiter) -> None:
        ids = [limiter.call_id() for _ in range(3)]
        for number, call_id in enumerate(ids):
            key = f"merchant:idle-{number}"
            assert (await limiter.acquire(key, ONE_IN_FLIGHT, call_id)).admitted
            limiter.release(key, call_id)
        await asyncio.sleep(RELEASE_FLUSH_SECONDS * 5)
        assert [in_flight(url, f"merchant:idle-{n}") for n in range(3)] == [set()] * 3
        # stop() sends what the timer has not yet.
        last = limiter.call_id()
        assert (await limiter.acquire("merchant:idle-0", ONE_IN_FLIGHT, last)).admitted
        limiter.release("merchant:idle-0", last)
        await limiter.stop()
        assert in_flight(url, "merchant:idle-0") == set()

    run(url, body)


def test_more_freed_slots_than_one_command_carries_are_all_freed(
    redis_server: EmbeddedRedis,
) -> None:
    url = redis_server.url
    many = MAX_RELEASES_PER_COMMAND * 2 + 5
    wide = Limit(100_000.0, 100_000, many + 1)

    async def body(limiter: RedisRateLimiter) -> None:
        ids = [limiter.call_id() for _ in range(many)]
        for call_id in ids:
            assert (await limiter.acquire("merchant:many", wide, call_id)).admitted
        for call_id in ids:
            limiter.release("merchant:many", call_id)
        extra = limiter.call_id()
        assert (await limiter.acquire("merchant:many", wide, extra)).admitted
        assert len(in_flight(url, "merchant:many")) == many + 1 - MAX_RELEASES_PER_COMMAND
        limiter.release("merchant:many", extra)
        await limiter.stop()
        assert in_flight(url, "merchant:many") == set()

    run(url, body)


def test_the_bound_holds_and_no_slot_leaks_under_load_through_a_flush_and_a_restart(
    redis_server: EmbeddedRedis,
) -> None:
    """200 concurrent callers over four principals, each bounded to 3 calls in flight: while
    Redis keeps its data no principal ever has more than 3 admitted calls running; a FLUSHALL and
    a restart of the Redis process cost calls (let through, as the limiter does when Redis does
    not answer) but no exception escapes, and once the calls end every slot is free again."""
    url = redis_server.url
    bound = Limit(100_000.0, 100_000, 3)
    principals = [f"merchant:load-{n}" for n in range(4)]

    async def body(limiter: RedisRateLimiter) -> dict[str, int]:
        running = dict.fromkeys(principals, 0)
        tally = {"admitted": 0, "refused": 0, "unanswered": 0, "over_bound": 0}
        trusted = asyncio.Event()  # set while Redis keeps what it was told
        trusted.set()
        done = asyncio.Event()

        async def caller(seed: int) -> None:
            chooser = random.Random(seed)
            while not done.is_set():
                key = chooser.choice(principals)
                call_id = limiter.call_id()
                try:
                    verdict = await limiter.acquire(key, bound, call_id)
                except Exception:
                    tally["unanswered"] += 1
                    await asyncio.sleep(0.005)
                    continue
                if not verdict.admitted:
                    tally["refused"] += 1
                    await asyncio.sleep(0.01)
                    continue
                tally["admitted"] += 1
                running[key] += 1
                if trusted.is_set() and running[key] > bound.max_in_flight:
                    tally["over_bound"] += 1
                try:
                    await asyncio.sleep(chooser.uniform(0, 0.003))
                finally:
                    running[key] -= 1
                    limiter.release(key, call_id)

        async def faults() -> None:
            await asyncio.sleep(0.3)
            trusted.clear()  # the in-flight sets are gone: the bound starts over
            redis.Redis.from_url(url).flushall()
            await asyncio.sleep(0.3)
            await asyncio.to_thread(redis_server.stop)
            await asyncio.sleep(0.2)
            await asyncio.to_thread(redis_server.start)
            await asyncio.sleep(0.3)
            done.set()

        await asyncio.gather(faults(), *(caller(seed) for seed in range(200)))
        await limiter.stop()
        return tally

    tally = run(url, body)
    print(tally)
    assert tally["over_bound"] == 0
    assert tally["admitted"] > 200 and tally["refused"] > 0 and tally["unanswered"] > 0
    assert [in_flight(url, key) for key in principals] == [set()] * len(principals)


def test_a_failed_admission_keeps_the_slots_it_carried(tmp_path: Path) -> None:
    """Redis stops between a release and the next admission: that admission fails, and the slot it
    would have freed is freed once Redis is back (not left to the TTL)."""
    server = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = server.start()

    def hold_the_timer(limiter: RedisRateLimiter) -> None:
        """The timer's flush is left out, so that only what the test does runs."""
        assert limiter.flush_timer is not None
        limiter.flush_timer.cancel()
        limiter.flush_timer = None

    async def body(limiter: RedisRateLimiter) -> None:
        first = limiter.call_id()
        assert (await limiter.acquire("merchant:kept", ONE_IN_FLIGHT, first)).admitted
        await asyncio.to_thread(server.stop)
        limiter.release("merchant:kept", first)
        hold_the_timer(limiter)  # the next admission is to carry it
        failed = limiter.call_id()
        with pytest.raises(RedisConnectionError):
            await limiter.acquire("merchant:kept", ONE_IN_FLIGHT, failed)
        # its own id too: the script may have run and given it a slot
        assert limiter.releasing == {"merchant:kept": [first, failed]}
        hold_the_timer(limiter)  # put back, and a flush is due for it
        # Redis restarted empty would forget the slot anyway: it is put back as it was.
        await asyncio.to_thread(server.start)
        admin = redis.Redis.from_url(url)
        admin.zadd(keys.rate_limit("merchant:kept")[1], {first: 2**40})
        await limiter.stop()
        assert in_flight(url, "merchant:kept") == set()

    try:
        run(url, body)
    finally:
        server.stop()


def test_an_admission_cancelled_after_its_script_ran_frees_its_slot(
    redis_server: EmbeddedRedis,
) -> None:
    """The call gives up (its deadline) while its admission waits on a busy Redis; the script runs
    afterwards and gives it a slot nobody would free: the limiter frees it."""
    url = redis_server.url

    async def body(limiter: RedisRateLimiter) -> None:
        busy = asyncio.create_task(asyncio.to_thread(redis.Redis.from_url(url).eval, BUSY, 0, 300))
        await asyncio.sleep(0.05)
        call_id = limiter.call_id()
        admission = asyncio.create_task(limiter.acquire("merchant:gave-up", ONE_IN_FLIGHT, call_id))
        await asyncio.sleep(0.05)
        admission.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admission
        await busy
        # The script ran once Redis was free, and the flush after it freed the slot again.
        deadline = asyncio.get_running_loop().time() + 1
        while in_flight(url, "merchant:gave-up") and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert in_flight(url, "merchant:gave-up") == set()
        assert (
            await limiter.acquire("merchant:gave-up", ONE_IN_FLIGHT, limiter.call_id())
        ).admitted
        await limiter.stop()

    run(url, body)


def test_a_release_on_a_later_event_loop_is_flushed(redis_server: EmbeddedRedis) -> None:
    """A limiter whose first loop ended with a flush still due (no stop) frees slots on the next."""
    url = redis_server.url
    client = PipelinedRedis.from_url(url, timeout_seconds=1)
    limiter = RedisRateLimiter(client)

    async def first() -> None:
        call_id = limiter.call_id()
        assert (await limiter.acquire("merchant:loops-1", ONE_IN_FLIGHT, call_id)).admitted
        limiter.release("merchant:loops-1", call_id)  # its timer dies with this loop
        await client.aclose()

    async def second() -> None:
        limiter.redis = PipelinedRedis.from_url(url, timeout_seconds=1)
        call_id = limiter.call_id()
        assert (await limiter.acquire("merchant:loops-2", ONE_IN_FLIGHT, call_id)).admitted
        limiter.release("merchant:loops-2", call_id)
        await asyncio.sleep(RELEASE_FLUSH_SECONDS * 5)
        assert in_flight(url, "merchant:loops-2") == set()
        assert in_flight(url, "merchant:loops-1") == set()
        await limiter.redis.aclose()

    asyncio.run(first())
    asyncio.run(second())


def test_one_failed_zrem_costs_the_other_principals_nothing(redis_server: EmbeddedRedis) -> None:
    """A connection that takes one command at a time: of three principals' ZREMs one is sent, and
    the two refused (too many commands in flight) do not take it down with them."""
    url = redis_server.url

    async def body() -> None:
        setup = RedisRateLimiter(PipelinedRedis.from_url(url, timeout_seconds=1))
        narrow = RedisRateLimiter(PipelinedRedis.from_url(url, timeout_seconds=1, pending_limit=1))
        principals = [f"merchant:narrow-{n}" for n in range(3)]
        for key in principals:
            call_id = setup.call_id()
            assert (await setup.acquire(key, ONE_IN_FLIGHT, call_id)).admitted
            narrow.releasing[key] = [call_id]
        await narrow.flush()
        left = [key for key in principals if in_flight(url, key)]
        assert len(left) == 2
        for key in left:
            narrow.release(key, next(iter(in_flight(url, key))).decode())
            await narrow.flush()
        assert [in_flight(url, key) for key in principals] == [set()] * 3
        await setup.redis.aclose()
        await narrow.redis.aclose()

    asyncio.run(body())
