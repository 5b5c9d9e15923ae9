"""CPU per Authorize of the Redis client: today's PipelinedRedis against redis-py and the
cluster-aware candidates of issue 13, on one node and on a 3-primary Redis Cluster.

    python -m loadtest.redis_client_benchmark [--operations 20000] [--concurrency 16]
                                              [--loop asyncio|uvloop]
                                              [--targets single,cluster] [--clients NAME,...]

Starts private, non-persistent redis-servers on loopback TCP (one node, and a cluster of 3
primaries + 3 replicas from tests/redis_cluster.py), marks every slot with a generation and
loads quotas for 1,000 beneficiaries, then runs Authorize's Redis commands (the real
authorize.lua by EVALSHA with its real arguments and the generation, SET NX and GET of the
merchant-wide key claim, ZADD of the due index: one batch, 3 slots) from `--concurrency`
coroutines, with each client in turn:

single node
- redis-py pipeline: redis-py's pipeline from a BlockingConnectionPool (what the service ran
  before PipelinedRedis);
- pipelined, pipelined x2: PipelinedRedis on one connection (what the service runs now), and
  two connections with calls alternating;
- coredis pipeline, glide batch: coredis's `Redis` and valkey-glide's `GlideClient` (the
  non-cluster mode of the cluster-aware candidates);

cluster
- redis-py cluster pipeline: `redis.asyncio.cluster.RedisCluster`'s pipeline (commands grouped
  by node, one round trip per node);
- coredis cluster pipeline: `coredis.RedisCluster`;
- glide cluster batch: `GlideClusterClient` with a non-atomic `ClusterBatch`;
- pipelined cluster router: ClusterPipelinedRedis (storage/redis/cluster.py), one PipelinedRedis
  per primary routed by slot, the slot map from redis-py's RedisCluster (the hot path's
  cluster client).

coredis and valkey-glide are optional (`pip install -e .[cluster-candidates]`); a missing one
is skipped. It prints this process's CPU time per operation (user + system of every thread,
from getrusage: the client's cost, glide's Rust threads included, not Redis's) and operations
per second. Each client runs once to warm up, then is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from authz_server.runtime.embedded_redis import redis_server_binary
from authz_server.service.ports import AuthorizeCall, QuotaRestore
from authz_server.storage.redis import keys, scripts
from authz_server.storage.redis.cluster import ClusterPipelinedRedis
from authz_server.storage.redis.pipelined import Command, PipelinedRedis
from authz_server.storage.redis.quota_io import QuotaRestoreCall
from authz_server.storage.redis.script_io import Authorize
from tests.redis_cluster import HOST, RedisClusterHarness, free_ports

BENEFICIARIES = 1_000
HOLD_MS = 15 * 60 * 1000
GENERATION = "bench-generation"

Operation = Callable[[list[Command]], Awaitable[Sequence[object]]]


@dataclass(frozen=True)
class Target:
    name: str
    addresses: list[tuple[str, int]]
    cluster: bool


def authorize_commands(sha: str, number: int, now_ms: int) -> list[Command]:
    """Authorize's batch, as HoldStore sends it (see _decide_and_claim), with the generation
    PipelinedRedis appends to every script."""
    beneficiary_id = f"bench-{number % BENEFICIARIES}"
    authorization_id = keys.new_authorization_id(beneficiary_id)
    idempotency_key = uuid.uuid4().hex
    digest = uuid.uuid4().hex
    call = Authorize(
        AuthorizeCall(
            authorization_id, "bench-merchant", beneficiary_id, idempotency_key, "PHARMACY",
            digest, 3_000, False, "", now_ms + HOLD_MS, "", False, False,
            "drug:2:1500|cream:1:1500", 3_000,
        ),
        now_ms,
    )  # fmt: skip
    claim_key = keys.idempotency_claim("bench-merchant", idempotency_key)
    return [
        (*call.command(), GENERATION),
        ("SET", claim_key, f"{digest}|{now_ms}", "NX"),
        ("GET", claim_key),
        ("ZADD", keys.DUE_HOLDS, "LT", now_ms + HOLD_MS, call.prefix),
    ]


def approved(replies: Sequence[object]) -> bool:
    decision = replies[0]
    return isinstance(decision, list) and decision[2] in (b"APPROVED", "APPROVED")


async def measure(
    operation: Operation, sha: str, operations: int, concurrency: int
) -> tuple[float, float]:
    """(CPU µs per operation, operations per second)."""
    now_ms = int(time.time() * 1000)
    numbers = iter(range(operations))
    batches = [authorize_commands(sha, number, now_ms) for number in range(operations)]

    async def worker() -> None:
        for number in numbers:
            replies = await operation(batches[number])
            assert approved(replies), replies

    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed_seconds = time.perf_counter() - started
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    return cpu_seconds / operations * 1e6, operations / elapsed_seconds


async def prepare(target: Target) -> str:
    """Scripts loaded (on every primary), every bench slot marked with GENERATION, one quota
    per beneficiary; the authorize script's sha."""
    client: Redis | RedisCluster
    if target.cluster:
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.addresses])
    else:
        (host, port), *_ = target.addresses
        client = Redis(host=host, port=port)
    try:
        restore = await client.script_load(scripts.source("quota_restore"))
        for name in scripts.ALL_SCRIPTS:  # SCRIPT LOAD: redis-py sends it to every primary
            await client.script_load(scripts.source(name))
        for number in range(BENEFICIARIES):
            relationship_id, beneficiary_id = f"bench-relationship-{number}", f"bench-{number}"
            prefix = keys.prefix(beneficiary_id)
            await client.set(keys.generation_marker(prefix), GENERATION)
            quota = QuotaRestore(
                relationship_id, beneficiary_id, "holder", True, 10**15, 1, "EMPLOYEE", 0
            )
            _, _, count, *rest = QuotaRestoreCall(quota, uuid.uuid4().hex[:16], 0).command()
            await client.evalsha(restore, int(count), *rest, GENERATION)
        return scripts.script("authorize").sha
    finally:
        await client.aclose()


Opener = Callable[[Target, contextlib.AsyncExitStack], Awaitable[Operation]]


async def open_redis_py(target: Target, stack: contextlib.AsyncExitStack) -> Operation:
    (host, port), *_ = target.addresses
    pool = BlockingConnectionPool(host=host, port=port, max_connections=256, timeout=2.0)
    client = Redis.from_pool(pool)
    stack.push_async_callback(client.aclose)

    async def operation(commands: list[Command]) -> Sequence[object]:
        async with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)

    return operation


async def open_pipelined(target: Target, stack: contextlib.AsyncExitStack) -> Operation:
    (host, port), *_ = target.addresses
    client = PipelinedRedis.from_url(f"redis://{host}:{port}/0", timeout_seconds=2.0)
    stack.push_async_callback(client.aclose)
    return client.execute_many


async def open_pipelined_two(target: Target, stack: contextlib.AsyncExitStack) -> Operation:
    (host, port), *_ = target.addresses
    clients = [
        PipelinedRedis.from_url(f"redis://{host}:{port}/0", timeout_seconds=2.0) for _ in range(2)
    ]
    for client in clients:
        stack.push_async_callback(client.aclose)
    alternate = itertools.cycle(clients)

    async def operation(commands: list[Command]) -> Sequence[object]:
        return await next(alternate).execute_many(commands)

    return operation


async def open_redis_py_cluster(target: Target, stack: contextlib.AsyncExitStack) -> Operation:
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.addresses])
    stack.push_async_callback(client.aclose)
    await client.initialize()

    async def operation(commands: list[Command]) -> Sequence[object]:
        async with client.pipeline() as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)

    return operation


async def open_cluster_router(target: Target, stack: contextlib.AsyncExitStack) -> Operation:
    seeds = ",".join(f"{host}:{port}" for host, port in target.addresses)
    client = ClusterPipelinedRedis.from_url(f"redis+cluster://{seeds}", timeout_seconds=2.0)
    stack.push_async_callback(client.aclose)
    return client.execute_many


async def open_coredis(target: Target, stack: contextlib.AsyncExitStack) -> Operation:
    import coredis
    from coredis.tokens import PureToken

    client: Any
    if target.cluster:
        nodes = [{"host": host, "port": port} for host, port in target.addresses]
        client = coredis.RedisCluster(startup_nodes=cast(Any, nodes))
    else:
        (host, port), *_ = target.addresses
        client = coredis.Redis(host=host, port=port)
    await stack.enter_async_context(client)

    async def operation(commands: list[Command]) -> Sequence[object]:
        (_, sha, count, *rest), (_, claim, value, _), _, (_, due, _, score, member) = commands
        script_keys, arguments = rest[: int(count)], rest[int(count) :]
        async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
            requests = [
                pipe.evalsha(sha, keys=script_keys, args=arguments),
                pipe.set(claim, value, condition=PureToken.NX),
                pipe.get(claim),
                pipe.zadd(due, {member: score}, comparison=PureToken.LT),
            ]
        return [await request for request in requests]

    return operation


async def open_glide(target: Target, stack: contextlib.AsyncExitStack) -> Operation:
    import glide

    addresses = [glide.NodeAddress(host, port) for host, port in target.addresses]
    client: Any
    if target.cluster:
        client = await glide.GlideClusterClient.create(
            glide.GlideClusterClientConfiguration(addresses)
        )
    else:
        client = await glide.GlideClient.create(glide.GlideClientConfiguration(addresses))
    stack.push_async_callback(client.close)
    batch_class: Any = glide.ClusterBatch if target.cluster else glide.Batch

    async def operation(commands: list[Command]) -> Sequence[object]:
        batch = batch_class(is_atomic=False)
        for command in commands:
            batch.custom_command([str(word) for word in command])
        replies = await client.exec(batch, raise_on_error=False)
        assert replies is not None
        return list(replies)

    return operation


CANDIDATES: list[tuple[str, bool, Opener]] = [
    # (name, for a cluster?, opener)
    ("redis-py pipeline", False, open_redis_py),
    ("pipelined", False, open_pipelined),
    ("pipelined x2", False, open_pipelined_two),
    ("coredis pipeline", False, open_coredis),
    ("glide batch", False, open_glide),
    ("redis-py cluster pipeline", True, open_redis_py_cluster),
    ("coredis cluster pipeline", True, open_coredis),
    ("glide cluster batch", True, open_glide),
    ("pipelined cluster router", True, open_cluster_router),
]


def available(opener: Opener) -> bool:
    optional: dict[Opener, str] = {open_coredis: "coredis", open_glide: "glide"}
    module = optional.get(opener)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


async def benchmark(
    targets: list[Target], operations: int, concurrency: int, loop_name: str, only: set[str]
) -> None:
    print(
        "Authorize's Redis commands (EVALSHA authorize.lua, SET NX, GET, ZADD): "
        f"{operations} operations, {concurrency} concurrent callers, {loop_name} loop"
    )
    print(f"{'target':<22} {'client':<26} {'CPU µs/op':>10} {'ops/s':>10}")
    for target in targets:
        sha = await prepare(target)
        for name, for_cluster, opener in CANDIDATES:
            if for_cluster != target.cluster or (only and name not in only):
                continue
            if not available(opener):
                print(f"{target.name:<22} {name:<26} {'(not installed)':>21}")
                continue
            async with contextlib.AsyncExitStack() as stack:
                operation = await opener(target, stack)
                await measure(operation, sha, max(1_000, operations // 10), concurrency)  # warm
                cpu_microseconds, per_second = await measure(
                    operation, sha, operations, concurrency
                )
            print(f"{target.name:<22} {name:<26} {cpu_microseconds:>10.1f} {per_second:>10.0f}")


@contextlib.contextmanager
def single_node(directory: Path) -> Any:
    (port,) = free_ports(1)
    process = subprocess.Popen(
        [redis_server_binary(), "--bind", HOST, "--port", str(port), "--dir", str(directory),
         "--save", "", "--appendonly", "no", "--loglevel", "warning",
         "--logfile", str(directory / "single-node.log")],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                import redis

                if redis.Redis(host=HOST, port=port).ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield Target("one node", [(HOST, port)], cluster=False)
    finally:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--targets", default="single,cluster")
    parser.add_argument("--clients", default="", help="comma-separated client names (all)")
    options = parser.parse_args()
    loop_factory = asyncio.new_event_loop
    if options.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    wanted = set(options.targets.split(","))
    only = {name.strip() for name in options.clients.split(",") if name.strip()}
    with (
        tempfile.TemporaryDirectory(prefix="redis-client-benchmark-") as directory,
        contextlib.ExitStack() as stack,
    ):
        targets: list[Target] = []
        if "single" in wanted:
            targets.append(stack.enter_context(single_node(Path(directory))))
        if "cluster" in wanted:
            cluster = RedisClusterHarness(Path(directory) / "cluster")
            stack.callback(cluster.stop)
            cluster.start()
            primaries = [(HOST, port) for port in cluster.primary_ports()]
            targets.append(Target("cluster (3 primaries)", primaries, cluster=True))
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(
                benchmark(targets, options.operations, options.concurrency, options.loop, only)
            )


if __name__ == "__main__":
    main()
