"""The run gate (storage/redis/pipelined.py `run_gate`, generation.HotStateGeneration.trusts):
a script goes only to a Redis process the adopted generation was built on. A Redis restarted
with its file, or a replica promoted in a primary's place, may miss the last writes; the
guardian notices it at its next look (every 0.5 s) and rebuilds from SQL, and until then no
decision is made there: the call answers UNAVAILABLE at once (UntrustedRedis) and wakes the
guardian. Real redis-servers: one node, and a 3 + 3 cluster whose primary is killed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.storage.redis.cluster import ClusterPipelinedRedis
from authz_server.storage.redis.generation import HotStateGeneration
from authz_server.storage.redis.pipelined import PipelinedRedis, Script, UntrustedRedis
from authz_server.storage.redis.runs import redis_run_ids
from tests.redis_cluster import HOST, RedisClusterHarness, running_cluster, slot_of

pytestmark = pytest.mark.backend_neutral

ECHO = Script("return KEYS[1]", "echo")


def run_gated(
    server: EmbeddedRedis,
    body: Callable[[PipelinedRedis, HotStateGeneration], Awaitable[None]],
) -> None:
    """Starts `server`, runs `body` with a pipelined client to it behind a run gate of its own,
    then closes the client and stops the server."""
    url = server.start()

    async def gated() -> None:
        gate = HotStateGeneration()
        client = PipelinedRedis.from_url(url, timeout_seconds=2.0)
        client.run_gate = gate
        try:
            await body(client, gate)
        finally:
            await client.aclose()

    try:
        asyncio.run(gated())
    finally:
        server.stop()


def test_a_restarted_redis_gets_no_script_until_its_run_is_trusted(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persistent=True)

    async def body(client: PipelinedRedis, gate: HotStateGeneration) -> None:
        # Nothing adopted yet: nothing to compare with (every script refuses anyway).
        assert await client.evalsha(ECHO, ["k"], []) == b"k"
        first = await redis_run_ids(client)
        gate.adopt("g1", first)
        assert await client.evalsha(ECHO, ["k"], []) == b"k"
        # The same Redis restarted with its file: a new process, a new run id.
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(5)
        server.start()
        gate.lost.clear()
        with pytest.raises(RedisConnectionError) as lost:  # the old connection went
            await client.evalsha(ECHO, ["k"], [])
        assert not isinstance(lost.value, UntrustedRedis)
        with pytest.raises(UntrustedRedis):  # the new one, to the new process
            await client.evalsha(ECHO, ["k"], [])
        assert gate.lost.is_set()  # the guardian is woken
        # Plain commands still pass (the guardian's own reads, a rebuild's writes).
        assert await client.execute("SET", "k", "v") == b"OK"
        # The guardian rebuilt (or found it the same): adopted on the new run, scripts flow.
        second = await redis_run_ids(client)
        assert second != first
        gate.adopt("g2", second)
        assert await client.evalsha(ECHO, ["k"], []) == b"k"

    run_gated(server, body)


def test_a_promoted_replica_gets_no_script_until_its_run_is_trusted(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "cluster") as cluster:
        asyncio.run(_promoted(cluster))


async def _promoted(cluster: RedisClusterHarness) -> None:
    seeds = ",".join(f"{HOST}:{port}" for port in cluster.primary_ports())
    gate = HotStateGeneration()
    client = ClusterPipelinedRedis.from_url(f"redis+cluster://{seeds}", timeout_seconds=2.0)
    client.run_gate = gate
    try:
        victim = cluster.primary_ports()[0]
        on_victim = next(
            key for key in (f"k{n}" for n in range(10_000)) if _owner(cluster, key) == victim
        )
        elsewhere = next(
            key for key in (f"k{n}" for n in range(10_000)) if _owner(cluster, key) != victim
        )
        gate.adopt("g1", await redis_run_ids(client))
        assert await client.evalsha(ECHO, [on_victim], []) == on_victim.encode()
        cluster.kill_primary(victim)
        promoted = await asyncio.to_thread(cluster.wait_for_promotion, victim)
        # The router finds the promoted replica by itself; its first script there is refused.
        refused = False
        for _ in range(200):
            try:
                await client.evalsha(ECHO, [on_victim], [])
            except UntrustedRedis:
                refused = True
                break
            except Exception:  # the dead node, until the router's map names the new one
                await asyncio.sleep(0.05)
                continue
            raise AssertionError(f"a script reached the promoted replica {promoted} untrusted")
        assert refused
        # The other shards are their old processes: served.
        assert await client.evalsha(ECHO, [elsewhere], []) == elsewhere.encode()
        gate.adopt("g2", await redis_run_ids(client))
        assert await client.evalsha(ECHO, [on_victim], []) == on_victim.encode()
    finally:
        await client.aclose()


def _owner(cluster: RedisClusterHarness, key: str) -> int:
    return cluster.owner_of_slot(slot_of(key))


def test_the_primaries_runs_are_read_again_after_a_failover_with_no_other_call(
    tmp_path: Path,
) -> None:
    """The guardian learns the primaries' runs through the router's slot map, and a primary
    that died failed that look every time, the map never refreshed, until some call routed by
    key hit the dead shard (an audit finding): meanwhile no change of run on any shard was
    acted on. A primary that does not answer the look has the map read again."""
    with running_cluster(tmp_path / "cluster") as cluster:
        asyncio.run(_runs_after_failover(cluster))


async def _runs_after_failover(cluster: RedisClusterHarness) -> None:
    seeds = ",".join(f"{HOST}:{port}" for port in cluster.primary_ports())
    client = ClusterPipelinedRedis.from_url(f"redis+cluster://{seeds}", timeout_seconds=1.0)
    try:
        before = await redis_run_ids(client)
        victim = cluster.primary_ports()[0]
        cluster.kill_primary(victim)
        await asyncio.to_thread(cluster.wait_for_promotion, victim)
        for _ in range(20):  # the guardian's looks, 0.5 s apart, and no other call
            try:
                after = await redis_run_ids(client)
            except (RedisError, OSError):  # the dead primary, until the map is read again
                await asyncio.sleep(0.5)
                continue
            assert after != before
            return
        raise AssertionError("the primaries' runs could not be read for 10 s after a failover")
    finally:
        await client.aclose()
