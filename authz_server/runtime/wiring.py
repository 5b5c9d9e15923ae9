"""The one composition root of storage: SQL, the hot state's Redis client and generation, the
quota cache, the hold store, the sweeper's store and the hot-state guardian, built the same way
for the server (server/app.py), the workers' supervisor and the reconcile command
(runtime/hot_state.py) and the jobs (cli.py).

The Redis client is chosen by the URL (settings.py, REDIS_URL): `redis+cluster://h:p,h:p` is a
Redis Cluster (storage/redis/cluster.py routes every command by its key's slot and follows
MOVED/ASK), anything else one node (storage/redis/pipelined.py). Everything above this module
sees a PipelinedRedis either way: the code paths are the same.

Here, under runtime/ and not under storage/: the guardian it wires is runtime (it rebuilds the
hot state from SQL), and storage must not depend on it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from authz_server.runtime.hot_state import HotStateGuardian
from authz_server.service.clock import Clock, system_clock
from authz_server.settings import Settings
from authz_server.storage.redis import scripts
from authz_server.storage.redis.cluster import ClusterPipelinedRedis, is_cluster_url
from authz_server.storage.redis.generation import HotStateGeneration
from authz_server.storage.redis.hold_store import HoldStore
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.quota_cache import RedisQuotaCache
from authz_server.storage.redis.sweep_store import SweepStore
from authz_server.storage.sql.database import Database


@dataclass(frozen=True)
class Storage:
    """Everything a process needs of SQL and the hot state, wired once."""

    database: Database
    # The hot state's client: every script, read, SCAN (through primaries()) and the guardian's
    # own commands. The process's only Redis client.
    redis: PipelinedRedis
    # The generation every script call carries (storage/redis/generation.py).
    generation: HotStateGeneration
    quotas: RedisQuotaCache
    holds: HoldStore
    # The sweeper's side: expiries and stalled captures through the indexes, the safety net.
    sweeps: SweepStore
    guardian: HotStateGuardian

    async def preload_scripts(self) -> None:
        """Every script on every primary (storage/redis/scripts.py)."""
        await scripts.preload(self.redis)


async def _nobody_listens(_ready: bool) -> None:
    return None


def open_redis(url: str, timeout_seconds: float) -> PipelinedRedis:
    """The hot state's client for `url`: a cluster client for a redis+cluster:// URL, else one
    node's. Connects lazily (on the first command)."""
    if is_cluster_url(url):
        return ClusterPipelinedRedis.from_url(url, timeout_seconds=timeout_seconds)
    return PipelinedRedis.from_url(url, timeout_seconds=timeout_seconds)


def open_database(settings: Settings) -> Database:
    """SQL alone, for the commands that do not touch the hot state (settlement, audit)."""
    return Database(settings.effective_database_url)


def open_storage(
    settings: Settings,
    redis_url: str,
    *,
    clock: Clock = system_clock,
    on_ready: Callable[[bool], Awaitable[None]] = _nobody_listens,
) -> Storage:
    """Builds (without connecting: SQL and Redis connect on first use) the storage of one
    process. `on_ready`: told when the guardian starts or stops trusting the hot state (the
    server's health); `clock`: the services' clock (tests move it)."""
    database = open_database(settings)
    redis = open_redis(redis_url, settings.redis_timeout_seconds)
    # Every script call carries the hot state's generation; the guardian rebuilds Redis from
    # SQL when it lost data (runtime/hot_state.py).
    generation = HotStateGeneration()
    redis.generation = generation
    # ...and goes only to the Redis processes that generation was built on: a replica promoted,
    # or a Redis restarted with its file, is refused before the guardian's next look.
    redis.run_gate = generation
    return Storage(
        database=database,
        redis=redis,
        generation=generation,
        quotas=RedisQuotaCache(redis),
        holds=HoldStore(redis),
        sweeps=SweepStore(redis),
        guardian=HotStateGuardian(database, redis, generation, on_ready, clock),
    )


async def close_storage(storage: Storage) -> None:
    """Redis, then SQL (for the commands and jobs; the server bounds each step of its stop on
    its own, server/app.py)."""
    storage.guardian.stop()
    try:
        await storage.redis.aclose()
    finally:
        storage.database.close()
