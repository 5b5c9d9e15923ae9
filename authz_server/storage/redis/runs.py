"""Which Redis processes, in which replication history, answer now: a primary's *run*.

The hot state is trusted only on the runs it was built on (storage/redis/generation.py,
runtime/hot_state.py). A run is '<run id>:<replication id>':
- the run id (INFO server `run_id`) is new whenever a Redis process starts: a restart (even with
  its file: the last second may be missing) or a replica promoted in a primary's place;
- the replication id (INFO replication `master_replid`) is new whenever a process becomes a
  primary, and a replica takes its primary's. So a primary that was demoted, resynced from a
  replica that had missed writes and was promoted back (a failback: the same process, its
  connections kept open) shows a new run too.

A primary also takes a new replication id without any change of role or data: when a replica
attaches while it has no replication backlog (the first replica, or one back after the backlog
was freed), and when it frees its backlog after `repl-backlog-ttl` without replicas. Then its
previous id (`master_replid2`) is cleared to zeros, while a promotion keeps the id it had there:
`renumbered_only` tells the two apart, and the guardian publishes the new runs instead of
rebuilding every shard (tests/test_redis_failback.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

if TYPE_CHECKING:
    from authz_server.storage.redis.pipelined import PipelinedRedis, Reply

# Between a run's run id and its replication id.
RUN_SEPARATOR = ":"
# What a Redis process is asked for its run: two sections, as Redis before 7 takes one a call.
RUN_COMMANDS: tuple[tuple[str, str], ...] = (("INFO", "server"), ("INFO", "replication"))
# master_replid2 when a primary's replication id changed without a promotion.
NO_REPLICATION_ID = "0" * 40


@dataclass(frozen=True)
class RedisRun:
    run_id: str
    # "" where a Redis hides it (a managed service): then a failback is not seen, as before.
    replication_id: str
    previous_replication_id: str

    def text(self) -> str:
        return f"{self.run_id}{RUN_SEPARATOR}{self.replication_id}"


def run_of(server: Reply, replication: Reply) -> RedisRun:
    """The run from the replies to RUN_COMMANDS."""
    return RedisRun(
        run_id=_info_field(server, "run_id", required=True),
        replication_id=_info_field(replication, "master_replid"),
        previous_replication_id=_info_field(replication, "master_replid2"),
    )


async def redis_runs(redis: PipelinedRedis) -> list[RedisRun]:
    """The run of every primary, asked of all at once (the guardian asks twice a second). A
    primary that does not answer makes a cluster client look at its slot map again (a replica
    promoted in its place is only found there)."""
    primaries = await redis.primaries()
    try:
        return list(await asyncio.gather(*(_run(node) for node in primaries)))
    except (RedisError, OSError, TimeoutError):
        redis.topology_suspect()
        raise


async def redis_run_ids(redis: PipelinedRedis) -> str:
    """`joined(await redis_runs(redis))`: what a generation is published with."""
    return joined(await redis_runs(redis))


def joined(runs: list[RedisRun]) -> str:
    return ",".join(sorted(run.text() for run in runs))


def same_runs(published: str, current: str) -> bool:
    """Whether the runs a generation was published with are the ones answering now. One
    published by a release that knew run ids only (no replication ids) is compared on the run
    ids: else, in a rolling upgrade, the servers of each release would rebuild the hot state
    in turn, each finding the other's publication foreign (RUNBOOK: a rebuild after the
    rollout, so that a failback is noticed from then on)."""
    if published == current:
        return True
    if is_legacy(published):
        run_ids = sorted(run.partition(RUN_SEPARATOR)[0] for run in current.split(",") if run)
        return published == ",".join(run_ids)
    return False


def is_legacy(published: str) -> bool:
    """Published by a release that knew run ids only."""
    return bool(published) and RUN_SEPARATOR not in published


def renumbered_only(published: str, runs: list[RedisRun]) -> bool:
    """Whether the runs answering now are the published ones but for replication ids their
    primaries took without a promotion (a backlog created or freed: master_replid2 cleared).
    A failback's promotion keeps the id it resynced under in master_replid2: not this."""
    if is_legacy(published):
        return False
    before = dict(entry.partition(RUN_SEPARATOR)[::2] for entry in published.split(",") if entry)
    if sorted(before) != sorted(run.run_id for run in runs):
        return False
    return all(
        run.replication_id == before[run.run_id] or run.previous_replication_id == NO_REPLICATION_ID
        for run in runs
    )


def _info_field(info: Reply, name: str, *, required: bool = False) -> str:
    """One `name:value` line of an INFO reply ("" when absent and not required)."""
    if isinstance(info, ResponseError):
        raise RedisConnectionError(f"Redis refused INFO: {info}")
    for line in (info.decode() if isinstance(info, bytes) else str(info)).splitlines():
        field, _, value = line.partition(":")
        if field == name:
            return value.strip()
    if required:
        raise RedisConnectionError(f"INFO names no {name}")
    return ""


async def _run(node: PipelinedRedis) -> RedisRun:
    server, replication = await node.execute_many(RUN_COMMANDS)
    return run_of(server, replication)
