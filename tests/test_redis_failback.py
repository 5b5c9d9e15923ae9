"""A failback to a primary that resynced from a replica that had missed writes (helper audit,
session 19). Primary A (its run in the published generation) has a replica B whose link breaks;
a hold is approved on A; B is promoted, A is demoted under it (a full resync: A now holds B's
older copy, without the hold) and promoted back. A's run id never changed, the connections to
it stayed open, and the generation, slot marks and witnesses came back through B unchanged:
before, the hot state was trusted and the hold's money approved a second time.

A primary's run is now its run id and its replication id (generation.run_of), new whenever it
becomes a primary; the guardian distrusts a generation published on other runs, the run gate
reads a connection's run again before it refuses it, and a READONLY reply (a primary demoted
under our connection) wakes the guardian. Real redis-servers throughout."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from authz_server.runtime.embedded_redis import EmbeddedRedis, redis_server_binary
from authz_server.storage.redis.generation import HotStateGeneration
from authz_server.storage.redis.pipelined import PipelinedRedis, Script, UntrustedRedis
from authz_server.storage.redis.runs import redis_run_ids, same_runs
from tests.harness import Harness
from tests.test_authorization_recovery import hot_figures, journaled
from tests.test_authorization_rules import (
    APPROVED,
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize,
    family,
    register_merchants,
)

ECHO = Script("return KEYS[1]", "echo")
WRITE = Script("return redis.call('SET', KEYS[1], 'v')", "write")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(condition: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not _answers(condition):
        assert time.monotonic() < deadline, "replication step not reached in time"
        time.sleep(0.05)


def _answers(condition: Callable[[], bool]) -> bool:
    try:
        return bool(condition())
    except redis_lib.RedisError:
        return False


def _link_up(client: redis_lib.Redis) -> bool:
    info = client.info("replication")
    return info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == 0


class Failback:
    """A's replica B, its link broken on demand, then the failover to B and back to A."""

    def __init__(self, primary: redis_lib.Redis, replica: redis_lib.Redis, port_a: int) -> None:
        self.primary, self.replica, self.port_a = primary, replica, port_a

    def break_link(self) -> None:
        """B stays a replica but takes no more writes (it logs in with what A refuses)."""
        self.replica.config_set("masteruser", "nobody-here")
        self.replica.config_set("masterauth", "wrong")
        self.replica.client_kill_filter(_type="master")
        _wait(lambda: self.replica.info("replication").get("master_link_status") == "down")

    def demote_primary(self) -> None:
        """B promoted; A resyncs from it (now holding B's older copy), still a replica."""
        self.replica.execute_command("REPLICAOF", "NO", "ONE")
        port_b = int(self.replica.connection_pool.connection_kwargs["port"])
        self.primary.execute_command("REPLICAOF", "127.0.0.1", str(port_b))
        _wait(lambda: _link_up(self.primary))

    def promote_primary_back(self) -> None:
        self.primary.execute_command("REPLICAOF", "NO", "ONE")


@contextmanager
def replica_of(primary: redis_lib.Redis, directory: Path) -> Iterator[Failback]:
    """A TCP port on `primary` (the embedded Redis listens on a unix socket only) and a
    redis-server replicating it; the port is closed again after."""
    port_a, port_b = _free_port(), _free_port()
    primary.config_set("port", port_a)
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [redis_server_binary(), "--port", str(port_b), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--replicaof", "127.0.0.1", str(port_a)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    replica = redis_lib.Redis(host="127.0.0.1", port=port_b)
    try:
        _wait(lambda: _link_up(replica))
        yield Failback(primary, replica, port_a)
    finally:
        # Shutting down closes the connection under the reply.
        with contextlib.suppress(redis_lib.RedisError):
            replica.shutdown(nosave=True)
        replica.close()
        process.wait(10)
        primary.config_set("port", 0)


def test_a_failback_changes_the_run_and_the_gate_reads_it_again(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "a", persistent=False)
    url = server.start()
    primary = redis_lib.Redis.from_url(url)

    async def scenario(failback: Failback) -> None:
        gate = HotStateGeneration()
        client = PipelinedRedis.from_url(url, timeout_seconds=2.0)
        client.run_gate = gate
        try:
            before = await redis_run_ids(client)
            gate.adopt("g1", before)
            assert await client.evalsha(WRITE, ["k"], []) == b"OK"
            failback.break_link()
            failback.demote_primary()
            # A replica now: a script that writes is refused READONLY, and wakes the guardian.
            gate.lost.clear()
            with pytest.raises(redis_lib.exceptions.ReadOnlyError):
                await client.evalsha(WRITE, ["k"], [])
            assert gate.lost.is_set()
            failback.promote_primary_back()
            after = await redis_run_ids(client)
            # The same process (run id), another run: the guardian does not trust it.
            assert after.split(":")[0] == before.split(":")[0]
            assert after != before and not same_runs(before, after)
            gate.distrust()  # what the guardian does then
            with pytest.raises(UntrustedRedis):
                await client.evalsha(ECHO, ["k"], [])
            # Rebuilt on the new run: the same connection's run is read again, and trusted.
            gate.adopt("g2", after)
            assert await client.evalsha(ECHO, ["k"], []) == b"k"
        finally:
            await client.aclose()

    try:
        with replica_of(primary, tmp_path / "b") as failback:
            asyncio.run(scenario(failback))
    finally:
        primary.close()
        server.stop()


def test_a_generation_published_with_run_ids_only_is_trusted_on_them() -> None:
    """A rolling upgrade: the release before published bare run ids. Trusted on those (else
    the servers of the two releases would rebuild in turn), never on other run ids."""
    current = "bbbb:r2,aaaa:r1"
    assert same_runs("aaaa,bbbb", ",".join(sorted(current.split(","))))
    assert not same_runs("aaaa,cccc", "aaaa:r1,bbbb:r2")
    assert not same_runs("aaaa:r0,bbbb:r2", "aaaa:r1,bbbb:r2")
    gate = HotStateGeneration()
    gate.adopt("g", "aaaa,bbbb")
    assert gate.trusts("aaaa:r1") and not gate.trusts("cccc:r1")
    gate.adopt("g", "aaaa:r1,bbbb:r2")
    assert gate.trusts("aaaa:r1") and not gate.trusts("aaaa:r9")


@pytest.mark.single_redis
def test_a_hold_approved_before_a_failback_is_not_approved_again(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, tmp_path: Path
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 10_000)
    beneficiary, (relationship_id,) = fam.beneficiary_id, fam.relationship_ids
    app = harness.app
    rebuilt_before = app.guardian.last_rebuild
    primary = harness.admin()
    assert isinstance(primary, redis_lib.Redis)
    try:
        with replica_of(primary, tmp_path / "b") as failback:
            failback.break_link()
            first = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 6_000)
            assert first.decision == APPROVED
            journaled(harness, first.authorization_id)
            assert hot_figures(harness, beneficiary, relationship_id) == (4_000, 6_000)
            failback.demote_primary()
            failback.promote_primary_back()
    finally:
        primary.close()
    # The guardian looks every 0.5 s: it finds another run, rebuilds from SQL (the hold put
    # back from the journal) and serves again.
    _wait(lambda: app.guardian.last_rebuild is not rebuilt_before and app.guardian.ready, 30)
    assert hot_figures(harness, beneficiary, relationship_id) == (4_000, 6_000)
    second = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 6_000)
    assert second.decision == DECLINED


# --- what the fix must not cost (a second audit): normal operation changes replication ids ----


def _settled(harness: Harness, seconds: float = 30.0) -> None:
    """Waits until the guardian trusts the hot state and no rebuild has happened for 1.5 s."""
    app = harness.app
    deadline = time.monotonic() + seconds
    while True:
        before = app.guardian.last_rebuild
        time.sleep(1.5)
        if app.guardian.ready and app.guardian.last_rebuild is before:
            return
        assert time.monotonic() < deadline, "the hot state never settled"


@pytest.mark.single_redis
def test_a_replica_attaching_or_leaving_for_good_rebuilds_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    """A primary takes a new replication id when a replica attaches while it has no backlog,
    and when it frees its backlog after repl-backlog-ttl without replicas: no promotion, no
    data lost (master_replid2 zeros). The guardian publishes the new runs; no rebuild."""
    app = harness.app
    primary = harness.admin()
    assert isinstance(primary, redis_lib.Redis)
    try:
        primary.config_set("repl-backlog-ttl", 1)  # one hour by default
        # No backlog to begin with (an earlier test's replica may have left one).
        _wait(lambda: primary.info("replication")["repl_backlog_active"] == 0, 10)
        _settled(harness)
        rebuilt_before, generation_before = app.guardian.last_rebuild, app.generation.value
        replication_id = primary.info("replication")["master_replid"]
        with replica_of(primary, tmp_path / "replica"):
            time.sleep(2.0)  # four guardian looks
            attached = primary.info("replication")["master_replid"]
            assert attached != replication_id
        _wait(lambda: primary.info("replication")["master_replid"] != attached, 10)
        time.sleep(1.5)
        assert app.guardian.last_rebuild is rebuilt_before
        assert app.generation.value == generation_before and app.guardian.ready
    finally:
        primary.config_set("repl-backlog-ttl", 3600)
        primary.close()


def test_calls_while_the_gate_reads_a_connections_run_again_wait_for_it(tmp_path: Path) -> None:
    """Right after the guardian adopted new runs, the first calls on a connection opened before
    wait for the one read of its run, instead of being refused (UNAVAILABLE) meanwhile."""
    server = EmbeddedRedis(tmp_path / "a", persistent=False)
    url = server.start()
    primary = redis_lib.Redis.from_url(url)

    async def opened() -> tuple[PipelinedRedis, HotStateGeneration, str]:
        gate = HotStateGeneration()
        client = PipelinedRedis.from_url(url, timeout_seconds=2.0)
        client.run_gate = gate
        before = await redis_run_ids(client)
        gate.adopt("g1", before)
        assert await client.evalsha(ECHO, ["k"], []) == b"k"  # the connection is open
        return client, gate, before

    async def after_the_run_changed(
        client: PipelinedRedis, gate: HotStateGeneration, before: str
    ) -> list[object]:
        after = await redis_run_ids(client)
        assert after != before  # same process, new replication id
        gate.adopt("g2", after)
        gate.lost.clear()
        return await asyncio.gather(
            *(client.evalsha(ECHO, [f"k{n}"], []) for n in range(20)), return_exceptions=True
        )

    loop = asyncio.new_event_loop()
    try:
        client, gate, before = loop.run_until_complete(opened())
        try:
            with replica_of(primary, tmp_path / "b"):  # the primary creates its backlog
                results = loop.run_until_complete(after_the_run_changed(client, gate, before))
        finally:
            loop.run_until_complete(client.aclose())
    finally:
        loop.close()
        primary.close()
        server.stop()
    assert results == [f"k{n}".encode() for n in range(20)], results
    assert not gate.lost.is_set()
