"""Per-principal limits in Redis (lua/rate_limit.lua): one EVALSHA on the pipelined connection
to admit a call, one ZREM (not awaited by the call) to free its in-flight slot.

A hand-written token bucket rather than a library: the Python rate-limit libraries with a
Redis backend (e.g. `limits`) take one round trip per window and have no bound on calls in
flight; this script does both in one round trip, on the connection the engine already
pipelines (loadtest/RESULTS.md measures what it adds to Authorize)."""

from __future__ import annotations

import itertools
import os

from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.quota_io import ADMITTED, REASONS, Limit, RateLimit, Verdict
from authz_server.storage.redis.script_io import run

__all__ = ["ADMITTED", "REASONS", "Limit", "RedisRateLimiter", "Verdict"]


class RedisRateLimiter:
    def __init__(self, redis: PipelinedRedis, in_flight_ttl_ms: int = 60_000) -> None:
        self.redis = redis
        self.in_flight_ttl_ms = in_flight_ttl_ms
        # call ids unique across processes: a random per-process prefix and a counter
        self.prefix = os.urandom(6).hex()
        self.counter = itertools.count(1)

    def call_id(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"

    async def acquire(self, principal_key: str, limit: Limit, call_id: str) -> Verdict:
        return await run(
            self.redis, RateLimit(principal_key, limit, call_id, self.in_flight_ttl_ms)
        )

    async def release(self, principal_key: str, call_id: str) -> None:
        await self.redis.execute("ZREM", keys.rate_limit(principal_key)[1], call_id)
