"""Per-principal limits in Redis (lua/rate_limit.lua): one EVALSHA on the pipelined connection
to admit a call, one ZREM (not awaited by the call) to free its in-flight slot.

A hand-written token bucket rather than a library: the Python rate-limit libraries with a
Redis backend (e.g. `limits`) take one round trip per window and have no bound on calls in
flight; this script does both in one round trip, on the connection the engine already
pipelines (loadtest/RESULTS.md measures what it adds to Authorize)."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from authz_server.storage.redis import keys, scripts
from authz_server.storage.redis.pipelined import PipelinedRedis, as_integer, as_list

RATE_LIMIT = scripts.script("rate_limit")


@dataclass(frozen=True)
class Limit:
    rate_per_second: float
    burst: int
    max_in_flight: int  # 0: no bound

    def __post_init__(self) -> None:
        if self.rate_per_second <= 0 or self.burst < 1 or self.max_in_flight < 0:
            raise ValueError("a limit needs rate > 0, burst >= 1 and in_flight >= 0")


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    retry_after_ms: int = 0
    # "RATE_LIMITED" or "TOO_MANY_IN_FLIGHT" when not admitted
    reason: str = ""


ADMITTED = Verdict(True)
REASONS = {1: "RATE_LIMITED", 2: "TOO_MANY_IN_FLIGHT"}


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
        reply = as_list(
            await self.redis.evalsha(
                RATE_LIMIT,
                keys.rate_limit(principal_key),
                (
                    repr(float(limit.rate_per_second)),
                    limit.burst,
                    limit.max_in_flight,
                    call_id,
                    self.in_flight_ttl_ms,
                ),
            )
        )
        if as_integer(reply[0]) == 1:
            return ADMITTED
        return Verdict(False, as_integer(reply[1]), REASONS[as_integer(reply[2])])

    async def release(self, principal_key: str, call_id: str) -> None:
        await self.redis.execute("ZREM", keys.rate_limit(principal_key)[1], call_id)
