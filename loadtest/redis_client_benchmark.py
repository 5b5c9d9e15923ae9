"""CPU per Authorize of the Redis client: redis-py's pipeline against PipelinedRedis.

    python -m loadtest.redis_client_benchmark [--operations 20000] [--concurrency 16]
                                              [--loop asyncio|uvloop]

Starts a private non-persistent redis-server on a unix socket (as the service does without
REDIS_URL), loads quotas for 1,000 beneficiaries, and runs Authorize's Redis commands (the real
authorize.lua by EVALSHA with its real arguments, SET NX and GET of the merchant-wide key claim,
ZADD of the due index: one pipeline) from `--concurrency` coroutines, with each client in turn:

- redis-py: what the service ran before, a pipeline from a BlockingConnectionPool;
- pipelined: PipelinedRedis, one connection (what the service runs now);
- pipelined x2: two PipelinedRedis connections, calls alternating between them.

It prints this process's CPU time per operation (user + system, from getrusage: the client's
cost, not Redis's) and operations per second. Each client runs once to warm up, then is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from redis.asyncio import BlockingConnectionPool, Redis

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.service.ports import QuotaRestore
from authz_server.storage.redis import keys, scripts
from authz_server.storage.redis.pipelined import Argument, Command, PipelinedRedis
from authz_server.storage.redis.quota_cache import RedisQuotaCache

BENEFICIARIES = 1_000
HOLD_MS = 15 * 60 * 1000

Operation = Callable[[list[Command]], Awaitable[object]]


def authorize_commands(sha: str, number: int, now_ms: int) -> list[Command]:
    """Authorize's pipeline, exactly as HoldStore sends it (see _decide_and_claim)."""
    beneficiary_id = f"bench-{number % BENEFICIARIES}"
    authorization_id = keys.new_authorization_id(beneficiary_id)
    idempotency_key = uuid.uuid4().hex
    prefix = keys.prefix(beneficiary_id)
    script_keys = [
        keys.authorization(authorization_id),
        keys.idempotency(beneficiary_id, "bench-merchant", idempotency_key),
        keys.quota_index(beneficiary_id),
        keys.expiry(prefix),
    ]
    digest = uuid.uuid4().hex
    arguments: list[Argument] = [
        prefix, now_ms, authorization_id, "bench-merchant", beneficiary_id, "PHARMACY", digest,
        3_000, 0, "", now_ms + HOLD_MS, "", 0, 0, "drug:2:1500|cream:1:1500", 3_000,
    ]  # fmt: skip
    claim_key = keys.idempotency_claim("bench-merchant", idempotency_key)
    return [
        ("EVALSHA", sha, len(script_keys), *script_keys, *arguments),
        ("SET", claim_key, f"{digest}|{now_ms}", "NX"),
        ("GET", claim_key),
        ("ZADD", keys.DUE_HOLDS, "LT", now_ms + HOLD_MS, prefix),
    ]


async def measure(
    name: str, operation: Operation, sha: str, operations: int, concurrency: int
) -> tuple[str, float, float]:
    """(name, CPU µs per operation, operations per second)."""
    now_ms = int(time.time() * 1000)
    numbers = iter(range(operations))
    batches = [authorize_commands(sha, number, now_ms) for number in range(operations)]

    async def worker() -> None:
        for number in numbers:
            replies = await operation(batches[number])
            assert isinstance(replies, list) and replies[0][2] == b"APPROVED", replies

    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed_seconds = time.perf_counter() - started
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    return name, cpu_seconds / operations * 1e6, operations / elapsed_seconds


async def benchmark(redis_url: str, operations: int, concurrency: int, loop_name: str) -> None:
    redis_py = Redis.from_pool(
        BlockingConnectionPool.from_url(redis_url, max_connections=256, timeout=2.0)
    )
    await scripts.preload(redis_py)
    sha = scripts.script("authorize").sha
    first = PipelinedRedis.from_url(redis_url, timeout_seconds=2.0)
    second = PipelinedRedis.from_url(redis_url, timeout_seconds=2.0)
    quotas = RedisQuotaCache(redis_py, first)
    for number in range(BENEFICIARIES):
        relationship_id, beneficiary_id = f"bench-relationship-{number}", f"bench-{number}"
        await quotas.restore(
            QuotaRestore(relationship_id, beneficiary_id, "holder", True, 10**15, 1, "EMPLOYEE", 0)
        )

    async def with_redis_py(commands: list[Command]) -> object:
        async with redis_py.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)

    alternate = itertools.cycle([first, second])

    async def with_two(commands: list[Command]) -> object:
        return await next(alternate).execute_many(commands)

    clients: list[tuple[str, Operation]] = [
        ("redis-py pipeline", with_redis_py),
        ("pipelined", first.execute_many),
        ("pipelined x2", with_two),
    ]
    print(
        "Authorize's Redis commands (EVALSHA authorize.lua, SET NX, GET, ZADD): "
        f"{operations} operations, {concurrency} concurrent callers, {loop_name} loop"
    )
    print(f"{'client':<20} {'CPU µs/op':>10} {'ops/s':>10}")
    for name, operation in clients:
        await measure(name, operation, sha, max(1_000, operations // 10), concurrency)  # warm-up
        name, cpu_microseconds, per_second = await measure(
            name, operation, sha, operations, concurrency
        )
        print(f"{name:<20} {cpu_microseconds:>10.1f} {per_second:>10.0f}")
    await first.aclose()
    await second.aclose()
    await redis_py.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    options = parser.parse_args()
    loop_factory = asyncio.new_event_loop
    if options.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with tempfile.TemporaryDirectory(prefix="redis-client-benchmark-") as directory:
        server = EmbeddedRedis(Path(directory) / "redis", persistent=False)
        try:
            url = server.start()
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(benchmark(url, options.operations, options.concurrency, options.loop))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
