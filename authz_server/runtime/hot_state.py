"""Keeps the hot state trustworthy without an operator: notices when Redis lost its data (or
may have), has exactly one server rebuild it from SQL (runtime/rebuild.py), and tells health.

Every server runs a guardian. It looks at keys.GENERATION every CHECK_SECONDS, and at once when a
call found its slot lost (storage/redis/generation.py). The hot state is trusted while that key
names a complete generation built in the Redis processes that answer now (the run ids of every
primary and its replication id, storage/redis/runs.py): a Redis that restarted (even with its
file: the last second of writes may be missing), a replica promoted in its place, a primary
promoted back after it resynced from such a replica, FLUSHALL, or a rebuild that died half-way
all fail that test. Then health turns NOT_SERVING and the servers race for a lock in
Redis (SET NX with an expiry, renewed while the rebuild runs): the winner rebuilds, the others
wait for the new generation. If the winner dies, its lock expires and another takes over.

On a Redis Cluster the test is per shard (a failover of any one primary changes its run id) but
the answer is a whole rebuild: every shard's hot state is rebuilt from SQL, not only the failed
one's. A rebuild costs what is open now (runtime/rebuild.py, seconds for 100,000 quotas), a
failover is rare, and one mechanism for every loss is easier to trust than a per-shard one. The
generation and the lock share the `{generation}` hash tag, so they live on one shard and are
read and written through the hot path's client like any key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from authz_server.observability import metrics
from authz_server.runtime.rebuild import (
    REPLACE_IF_UNCHANGED,
    RebuildAbandoned,
    RebuildReport,
    rebuild_hot_state,
)
from authz_server.service.clock import Clock, system_clock
from authz_server.storage.redis import keys
from authz_server.storage.redis.generation import GlobalMarker, HotStateGeneration
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.runs import (
    is_legacy,
    joined,
    redis_runs,
    renumbered_only,
    same_runs,
)
from authz_server.storage.sql.database import Database

if TYPE_CHECKING:
    from authz_server.runtime.reconcile import ReconcileReport
    from authz_server.settings import Settings

log = logging.getLogger(__name__)
# How often each server looks at the generation while all is well (a call that finds its slot
# lost wakes it at once). Bounds how long a promoted replica's older copy can go unnoticed.
CHECK_SECONDS = 0.5
# The least time between two looks: under load every refused call wakes the guardian (a slot
# lost, the run gate), and without a floor it would read the generation and every primary's
# INFO back to back while another server rebuilds. The calls answer UNAVAILABLE meanwhile.
MIN_CHECK_SECONDS = 0.05
# The rebuild lock's expiry, and how often its owner renews it.
LOCK_SECONDS = 15
RENEW_SECONDS = 5.0
# How long a starting process waits for the hot state (its own rebuild, or another server's).
START_WAIT_SECONDS = 300.0


class HotStateGuardian:
    def __init__(
        self,
        database: Database,
        commands: PipelinedRedis,
        generation: HotStateGeneration,
        on_ready: Callable[[bool], Awaitable[None]],
        clock: Clock = system_clock,
    ) -> None:
        self.database = database
        self.commands = commands
        self.generation = generation
        self.on_ready = on_ready
        self.clock = clock
        self.ready = False
        self.stopping = False
        self.last_rebuild: RebuildReport | None = None
        # The legacy generation (storage/redis/runs.py is_legacy) last warned of.
        self.warned_legacy = ""

    async def run(self) -> None:
        """Checks until stopped (or cancelled); a failed check (Redis down) counts as not
        ready."""
        while not self.stopping:
            try:
                await self.check()
            except Exception as error:
                log.warning("hot state check failed: %s", error)
                await self._set_ready(False)
            if self.stopping:
                return
            await asyncio.sleep(MIN_CHECK_SECONDS)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHECK_SECONDS - MIN_CHECK_SECONDS):
                    await self.generation.wait_lost()

    def stop(self) -> None:
        """Ends run() at once. A flag as well as the task's cancel: a cancel that lands inside
        the Redis client can be lost (seen here: the stop then waited for a task that went on
        checking)."""
        self.stopping = True
        self.generation.lost.set()

    async def check(self) -> bool:
        """Trusts the hot state, or rebuilds it (when this server wins the lock). True when the
        hot state is ready now."""
        marker = GlobalMarker.parse(await self.commands.execute("GET", keys.GENERATION))
        runs = await redis_runs(self.commands)
        run_ids = joined(runs)
        if marker is not None and not marker.rebuilding:
            if same_runs(marker.run_ids, run_ids):
                self._warn_if_legacy(marker)
                self.generation.adopt(marker.generation, marker.run_ids)
                await self._set_ready(True)
                return True
            if renumbered_only(marker.run_ids, runs) and await self._republish(marker, run_ids):
                log.info(
                    "Redis primaries took new replication ids without a promotion (a replica "
                    "attached, or a backlog freed): generation %s published on %s",
                    marker.generation, run_ids,
                )  # fmt: skip
                self.generation.adopt(marker.generation, run_ids)
                await self._set_ready(True)
                return True
        # No script until a generation is adopted again: a connection to a primary promoted
        # back stays open, and would pass the run gate on the run it read when it opened.
        self.generation.distrust()
        await self._set_ready(False)
        token = os.urandom(8).hex()
        taken = await self.commands.execute(
            "SET", keys.REBUILD_LOCK, token, "NX", "EX", LOCK_SECONDS
        )
        if taken is None:
            return False  # another server rebuilds; its generation is adopted when published
        still_owner = asyncio.Event()
        still_owner.set()
        renewing = asyncio.get_running_loop().create_task(self._renew(token, still_owner))
        try:
            metrics.hot_state_rebuilds.inc()
            report = await rebuild_hot_state(
                self.database, self.commands, run_ids, still_owner, self.clock
            )
        except RebuildAbandoned:
            log.warning("hot state rebuild abandoned: another server took it over")
            return False
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            with contextlib.suppress(Exception):
                if await self.commands.execute("GET", keys.REBUILD_LOCK) == token.encode():
                    await self.commands.execute("DEL", keys.REBUILD_LOCK)
        self.last_rebuild = report
        metrics.hot_state_rebuild_seconds.set(report.seconds)
        self.generation.adopt(report.generation, run_ids)
        await self._set_ready(True)
        return True

    async def _republish(self, marker: GlobalMarker, run_ids: str) -> bool:
        """The same generation published on the runs answering now, if the marker is still
        the one read (another server may have done it, or begun a rebuild)."""
        renumbered = GlobalMarker(marker.generation, run_ids, rebuilding=False)
        replaced = await self.commands.execute(
            "EVAL", REPLACE_IF_UNCHANGED, 1, keys.GENERATION, marker.text(), renumbered.text()
        )
        return replaced == 1

    def _warn_if_legacy(self, marker: GlobalMarker) -> None:
        if is_legacy(marker.run_ids) and marker.generation != self.warned_legacy:
            self.warned_legacy = marker.generation
            log.warning(
                "hot state generation %s was published by a release without replication ids: "
                "a failback to a primary that resynced from a stale replica is not noticed "
                "until the next rebuild (RUNBOOK: after the rollout, rebuild once)",
                marker.generation,
            )

    async def wait_ready(self, timeout_seconds: float) -> bool:
        """Checks (and rebuilds, or waits for another server's rebuild) until the hot state is
        ready or the time is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while True:
            try:
                if await self.check():
                    return True
            except Exception as error:
                log.warning("hot state check failed: %s", error)
            if loop.time() > deadline:
                return False
            await asyncio.sleep(CHECK_SECONDS / 2)

    async def _renew(self, token: str, still_owner: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                if await self.commands.execute("GET", keys.REBUILD_LOCK) != token.encode():
                    still_owner.clear()
                    return
                await self.commands.execute("EXPIRE", keys.REBUILD_LOCK, LOCK_SECONDS)
            except Exception as error:  # Redis gone again: the rebuild itself will fail
                log.warning("rebuild lock not renewed: %s", error)

    async def _set_ready(self, ready: bool) -> None:
        metrics.hot_state_ready.set(1 if ready else 0)
        if ready == self.ready:
            return
        log.warning("hot state %s", "ready" if ready else "not trusted: serving stops")
        self.ready = ready
        await self.on_ready(ready)


async def trusted_and_reconciled(
    settings: Settings, redis_url: str
) -> tuple[ReconcileReport, RebuildReport | None]:
    """For a process that does not serve (the workers' supervisor, the reconcile command): the
    hot state made trustworthy (rebuilt from SQL when it is not), then reconciled with SQL.
    Returns the reconcile's report and the rebuild this process ran (None: it trusted Redis as
    it was, or another server rebuilt it): the workers' supervisor has no metrics of its own, so
    worker 0 counts it (runtime/serving.py)."""
    from authz_server.runtime.reconcile import reconcile
    from authz_server.runtime.wiring import close_storage, open_storage

    storage = open_storage(settings, redis_url)
    try:
        await storage.preload_scripts()
        if not await storage.guardian.wait_ready(START_WAIT_SECONDS):
            raise RuntimeError("the hot state could not be rebuilt from SQL in time")
        report = await reconcile(storage.database, storage.quotas, storage.holds)
        return report, storage.guardian.last_rebuild
    finally:
        await close_storage(storage)
