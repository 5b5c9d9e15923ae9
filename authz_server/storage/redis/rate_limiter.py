"""Per-principal limits in Redis (lua/rate_limit.lua): one EVALSHA on the pipelined connection
to admit a call; its in-flight slot is freed by the principal's next admission.

A hand-written token bucket rather than a library: the Python rate-limit libraries with a
Redis backend (e.g. `limits`) take one round trip per window and have no bound on calls in
flight; this script does both in one round trip, on the connection the engine already
pipelines (loadtest/RESULTS.md measures what it adds to Authorize).

Freeing a slot costs no command of its own: the ids of the calls ended since a principal's last
admission ride on its next one (the script removes them before it counts the calls in flight),
and what no admission took within RELEASE_FLUSH_SECONDS goes in one ZREM per principal. A
ZREM per call was a third of the limiter's Redis commands and a task per call
(loadtest/RESULTS.md). A slot is thus freed for this process's next call of the principal at
once, and for other processes at most RELEASE_FLUSH_SECONDS late; one whose ZREM is lost (Redis
not answering) is freed by its TTL."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.quota_io import ADMITTED, REASONS, Limit, RateLimit, Verdict
from authz_server.storage.redis.script_io import run

__all__ = ["ADMITTED", "REASONS", "Limit", "RedisRateLimiter", "Verdict"]

log = logging.getLogger(__name__)

# How late a freed slot may reach Redis when no admission of its principal carries it.
RELEASE_FLUSH_SECONDS = 0.01
# Freed slots one admission or one ZREM carries at most (the script unpacks them as arguments).
MAX_RELEASES_PER_COMMAND = 256


class RedisRateLimiter:
    def __init__(self, redis: PipelinedRedis, in_flight_ttl_ms: int = 60_000) -> None:
        self.redis = redis
        self.in_flight_ttl_ms = in_flight_ttl_ms
        # call ids unique across processes: a random per-process prefix and a counter
        self.prefix = os.urandom(6).hex()
        self.counter = itertools.count(1)
        # principal key -> ids of its calls ended whose slots Redis still counts. Bounded by
        # the calls in flight: an id is added once, when its call ends.
        self.releasing: dict[str, list[str]] = {}
        self.flush_timer: asyncio.TimerHandle | None = None
        self.flush_loop: asyncio.AbstractEventLoop | None = None  # the timer's
        self.flushes: set[asyncio.Task[None]] = set()

    def call_id(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"

    async def acquire(self, principal_key: str, limit: Limit, call_id: str) -> Verdict:
        """Admits the call or not; frees the slots of the principal's calls ended since."""
        releases = self._take(principal_key)
        try:
            return await run(
                self.redis,
                RateLimit(principal_key, limit, call_id, self.in_flight_ttl_ms, releases),
            )
        except BaseException:
            # The script may have run (its reply lost, or this call cancelled while it waited):
            # the slots it carried are freed again, and the one it may have given this call,
            # which the caller will not free (ZREM of an id never added does nothing).
            self.release_all(principal_key, (*releases, call_id))
            raise

    def release(self, principal_key: str, call_id: str) -> None:
        """Frees the call's in-flight slot: with the principal's next admission, or within
        RELEASE_FLUSH_SECONDS. Never waits."""
        self.release_all(principal_key, (call_id,))

    def release_all(self, principal_key: str, call_ids: tuple[str, ...]) -> None:
        self.releasing.setdefault(principal_key, []).extend(call_ids)
        flush_loop = self.flush_loop
        # A flush is due on a live loop: it takes these too (no loop look-up per call). A timer
        # of a loop that has ended (in tests and tools) would never fire: one is set here.
        if self.flush_timer is not None and flush_loop is not None and not flush_loop.is_closed():
            return
        if self.flush_timer is not None:
            self.flush_timer.cancel()
        loop = self.flush_loop = asyncio.get_running_loop()
        self.flush_timer = loop.call_later(RELEASE_FLUSH_SECONDS, self._flush_later)

    def _take(self, principal_key: str) -> tuple[str, ...]:
        pending = self.releasing.get(principal_key)
        if not pending:
            return ()
        if len(pending) <= MAX_RELEASES_PER_COMMAND:
            del self.releasing[principal_key]
            return tuple(pending)
        taken = tuple(pending[:MAX_RELEASES_PER_COMMAND])
        del pending[:MAX_RELEASES_PER_COMMAND]
        return taken

    def _flush_later(self) -> None:
        self.flush_timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self.flushes.add(task)
        task.add_done_callback(self.flushes.discard)

    async def flush(self) -> None:
        """Sends every freed slot no admission has carried: a ZREM per principal, each on its
        own, so one that fails (its Redis node down, the connection's command limit reached)
        costs the others nothing, and on a Cluster they go to their nodes at once. On one
        connection they still leave in one write."""
        commands = []
        while self.releasing:
            principal_key = next(iter(self.releasing))
            call_ids = self._take(principal_key)
            commands.append(("ZREM", keys.rate_limit(principal_key)[1], *call_ids))
        results = await asyncio.gather(
            *(self.redis.execute_many((command,)) for command in commands),
            return_exceptions=True,
        )
        failed = sum(1 for result in results if isinstance(result, BaseException))
        if failed:
            log.debug("%d of %d ZREMs of ended calls failed (their TTL frees them)", failed,
                      len(commands))  # fmt: skip

    async def stop(self) -> None:
        """Sends what is left to free (shutdown)."""
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        await asyncio.gather(*self.flushes, return_exceptions=True)
        await self.flush()
