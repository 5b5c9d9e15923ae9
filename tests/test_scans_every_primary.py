"""Every keyless command runs on every primary (storage/redis/scans.py): two Redis servers
stand in for a cluster's primaries (PipelinedRedis.primaries), and the safety net's resumable
scan, the full scans, DBSIZE, SCRIPT LOAD, the rebuild's delete and the retention purge each
cover both."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.storage.redis import keys, scans, scripts
from authz_server.storage.redis.pipelined import (
    Command,
    PipelinedRedis,
    RedisAddress,
    Reply,
    as_text,
)
from authz_server.storage.redis.rebuild_writer import delete_hot_state
from authz_server.storage.redis.retention import purge_idempotency_before
from authz_server.storage.redis.sweep_store import SweepStore

pytestmark = pytest.mark.backend_neutral

T = TypeVar("T")


class TwoPrimaries(PipelinedRedis):
    """Two servers as a cluster's primaries: a keyed command goes to the server its hash slot
    falls to (slot parity), as a cluster client routes it; keyless ones must go through
    primaries()."""

    def __init__(self, nodes: list[PipelinedRedis]) -> None:
        super().__init__(nodes[0].address, timeout_seconds=2)
        self.nodes = nodes

    async def primaries(self) -> list[PipelinedRedis]:
        return self.nodes

    def node_of(self, key: str) -> int:
        return key_slot(key.encode()) % len(self.nodes)

    async def transmit(self, commands: Sequence[Command]) -> list[Reply]:
        replies: list[Reply] = []
        for command in commands:
            name = str(command[0]).upper()
            if name in ("SCAN", "DBSIZE", "SCRIPT", "FLUSHALL"):
                raise AssertionError(f"{name} sent by key: it must go to every primary")
            key = command[3] if name in ("EVALSHA", "EVAL") else command[1]
            node = self.nodes[self.node_of(as_text(key))]
            (reply,) = await node.transmit([command])
            replies.append(reply)
        return replies


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    servers = [
        EmbeddedRedis(tmp_path_factory.mktemp(f"primary{n}") / "redis", persistent=False)
        for n in range(2)
    ]
    yield [server.start() for server in servers]
    for server in servers:
        server.stop()


def run(urls: list[str], body: Callable[[TwoPrimaries, list[Redis]], Awaitable[T]]) -> T:
    async def main() -> T:
        admins = [Redis.from_url(url) for url in urls]
        for admin in admins:
            await admin.flushall()
        nodes = [PipelinedRedis(RedisAddress.from_url(url), timeout_seconds=2) for url in urls]
        redis = TwoPrimaries(nodes)
        try:
            return await body(redis, admins)
        finally:
            for closing in (redis, *nodes):
                await closing.aclose()
            for admin in admins:
                await admin.aclose()

    return asyncio.run(main())


def test_the_safety_net_scan_passes_over_every_primary(urls: list[str]) -> None:
    async def body(redis: TwoPrimaries, admins: list[Redis]) -> None:
        for number in range(60):
            await redis.execute("ZADD", keys.expiry(keys.prefix(f"b{number}")), 1, "a")
        assert all([await admin.dbsize() > 10 for admin in admins])  # both hold some
        seen: set[str] = set()
        cursor, steps = 0, 0
        while True:
            cursor, names = await scans.scan_step(redis, cursor, keys.SLOT_ZSETS, 7, "zset")
            seen.update(names)
            steps += 1
            if cursor == 0:
                break
        assert len(seen) == 60 and steps > 2
        assert await scans.keys_in_database(redis) == 60
        # the safety net puts every slot of both back in the due index
        sweeps = SweepStore(redis)
        step_cursor, open_holds = 0, 0
        while True:
            step = await sweeps.index_step(step_cursor, 1000)
            open_holds += step.open_holds
            step_cursor = step.cursor
            if step_cursor == 0:
                break
        assert open_holds == 60
        for number in range(10):  # the full scan finds both servers' slots
            await redis.execute("ZADD", keys.capturing(keys.prefix(f"b{number}")), 1, f"a{number}")
        stalled = await sweeps.stalled_captures(now_ms=10, older_than_ms=0)
        assert sorted(stalled) == sorted(f"a{number}" for number in range(10))

    run(urls, body)


def test_a_pass_begins_again_when_the_primaries_change(urls: list[str]) -> None:
    async def body(redis: TwoPrimaries, admins: list[Redis]) -> None:
        await admins[1].zadd(keys.expiry(keys.prefix("late")), {"a": 1})
        cursor = scans._join(1, 2, 0)  # a pass at the second of two primaries
        redis.nodes = redis.nodes[:1]  # now one: the pass restarts at the first
        cursor, names = await scans.scan_step(redis, cursor, keys.SLOT_ZSETS, 100, "zset")
        assert cursor == 0 and names == []

    run(urls, body)


def test_scripts_are_loaded_on_every_primary(urls: list[str]) -> None:
    async def body(redis: TwoPrimaries, admins: list[Redis]) -> None:
        await scripts.preload(redis)
        sha = scripts.script("authorize").sha
        for admin in admins:
            assert await admin.script_exists(sha) == [True]

    run(urls, body)


def test_the_rebuild_deletes_on_every_primary_one_slot_per_unlink(urls: list[str]) -> None:
    async def body(redis: TwoPrimaries, admins: list[Redis]) -> None:
        for number in range(20):
            beneficiary = f"b{number}"
            await redis.execute("SET", keys.generation_marker(keys.prefix(beneficiary)), "g")
            await redis.execute("HSET", keys.quota(beneficiary, "r"), "available", 1)
            await redis.execute("HSET", keys.quota(beneficiary, "s"), "available", 1)
        await redis.execute("SET", keys.GENERATION, "g|run")
        sent: list[Command] = []
        transmit = redis.transmit

        async def recorded(commands: Sequence[Command]) -> list[Reply]:
            sent.extend(commands)
            return await transmit(commands)

        redis.transmit = recorded  # type: ignore[method-assign]
        assert await delete_hot_state(redis) == 60
        unlinks = [command for command in sent if command[0] == "UNLINK"]
        assert unlinks
        for command in unlinks:  # one hash slot per UNLINK, as a cluster requires
            assert len(scans.by_slot([as_text(name) for name in command[1:]])) == 1
        scripted = [command for command in sent if command[0] == "EVAL"]
        for command in scripted:  # a slot's keys deleted unless marked: its keys in one slot
            named = [as_text(name) for name in command[3 : 3 + int(command[2])]]
            assert len(scans.by_slot(named)) == 1
        assert sum([await admin.dbsize() for admin in admins]) == 1  # the generation kept

    run(urls, body)


def test_retention_purges_on_every_primary(urls: list[str]) -> None:
    async def body(redis: TwoPrimaries, admins: list[Redis]) -> None:
        for number in range(20):
            for key, created in (("old", 1), ("new", 10)):
                record = keys.idempotency(f"b{number}", "m", key + str(number))
                await redis.execute("HSET", record, "cr", created)
                claim = keys.idempotency_claim("m", key + str(number))
                await redis.execute("SET", claim, f"digest|{created}")
        assert await purge_idempotency_before(redis, 5) == 40
        assert sum([await admin.dbsize() for admin in admins]) == 40  # the new ones
        assert all([await admin.dbsize() > 0 for admin in admins])

    run(urls, body)
