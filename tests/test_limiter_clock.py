"""The limiter's bucket on a Redis whose clock is behind the one that last wrote it (a failover to
a replica with a slower clock, a primary's clock stepped back, a restart from another host's
file): its last refill is in this Redis's future. It starts full, as a bucket Redis lost does,
instead of refusing the principal until this clock has caught up. On a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.rate_limiter import Limit, RedisRateLimiter

pytestmark = pytest.mark.backend_neutral

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("limiter-clock") / "redis", persistent=False)
    server.start()
    yield server
    server.stop()


def test_a_bucket_written_by_a_clock_ahead_of_this_one_does_not_refuse_for_the_difference(
    redis_server: EmbeddedRedis,
) -> None:
    principal = "merchant:skewed"
    bucket = keys.rate_limit(principal)[0]
    admin = redis.Redis.from_url(redis_server.url)
    try:
        seconds, micros = admin.time()
        now_ms = seconds * 1000 + micros // 1000
        # Emptied by a flood on a primary whose clock ran an hour ahead of this one; its expiry
        # (an absolute time, as replicas and files keep it) an hour later here too.
        admin.hset(bucket, mapping={"t": "0.000000", "ts": str(now_ms + HOUR_MS)})
        admin.pexpire(bucket, HOUR_MS + 3_000)
    finally:
        admin.close()
    limit = Limit(100.0, 5, 0)  # a token every 10 ms

    async def main() -> list[bool]:
        client = PipelinedRedis.from_url(redis_server.url, timeout_seconds=1)
        limiter = RedisRateLimiter(client)
        try:
            admitted = []
            for _ in range(10):  # half a second: fifty tokens' worth at this rate
                verdict = await limiter.acquire(principal, limit, limiter.call_id())
                admitted.append(verdict.admitted)
                await asyncio.sleep(0.05)
            return admitted
        finally:
            await limiter.stop()
            await client.aclose()

    admitted = asyncio.run(main())
    assert all(admitted), admitted
