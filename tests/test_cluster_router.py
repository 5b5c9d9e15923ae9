"""ClusterPipelinedRedis (storage/redis/cluster.py) against a real 3 primaries + 3 replicas
cluster (tests/redis_cluster.py): batches over many slots answer in order, scripts carry and
check the generation per slot, MOVED and ASK are followed, a killed primary fails its own slots
with an error (never a wrong reply) until its replica is promoted, then the same client answers
again by itself, scripts included. The failover test kills a primary: it runs last."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
from redis.exceptions import RedisError, ResponseError

from authz_server.storage.redis import keys
from authz_server.storage.redis.cluster import ClusterPipelinedRedis, is_cluster_url
from authz_server.storage.redis.generation import HotStateGeneration
from authz_server.storage.redis.pipelined import Command, Reply, Script, as_integer
from authz_server.storage.redis.rebuild_writer import witness_commands
from tests.redis_cluster import HOST, RedisClusterHarness, cluster_fixture, slot_of

pytestmark = pytest.mark.backend_neutral

redis_cluster = cluster_fixture()


def _generation_lua() -> str:
    from importlib import resources

    return resources.files("authz_server.storage.redis").joinpath("lua/_generation.lua").read_text()


# Answers what the generation check let through: the value written and the generation the
# connection appended (the script's last argument).
STAMPED = Script(
    _generation_lua()
    + "\nredis.call('HSET', KEYS[1], 'available', ARGV[1])\n"
    + "return {redis.call('HGET', KEYS[1], 'available'), ARGV[#ARGV]}\n",
    "stamped",
)


def run(
    test: Callable[[ClusterPipelinedRedis], Awaitable[None]], cluster: RedisClusterHarness
) -> None:
    async def body() -> None:
        seeds = ",".join(f"{HOST}:{port}" for port in cluster.primary_ports()[:2])
        client = ClusterPipelinedRedis.from_url(f"redis+cluster://{seeds}", timeout_seconds=2.0)
        try:
            await test(client)
        finally:
            await client.aclose()

    asyncio.run(body())


def prefixes_by_primary(cluster: RedisClusterHarness, per_primary: int) -> dict[int, list[str]]:
    """`per_primary` beneficiary slot prefixes (mw:{b:<8 hex>}) on each primary, fresh ones."""
    ranges = {port: cluster.slots_of(port) for port in cluster.primary_ports()}
    found: dict[int, list[str]] = {port: [] for port in ranges}
    while any(len(prefixes) < per_primary for prefixes in found.values()):
        prefix = keys.prefix_of_digest(uuid.uuid4().hex[:8])
        slot = slot_of(prefix)
        owner = next(p for p, spans in ranges.items() if any(a <= slot <= b for a, b in spans))
        if len(found[owner]) < per_primary:
            found[owner].append(prefix)
    return found


def test_url() -> None:
    assert is_cluster_url("redis+cluster://a:1,b:2")
    assert not is_cluster_url("redis://a:1")
    client = ClusterPipelinedRedis.from_url(
        "redis+cluster://me:s%40cret@10.0.0.1:7000,10.0.0.2:7001", timeout_seconds=1.0
    )
    assert (client.address.username, client.address.password) == ("me", "s@cret")
    assert sorted(client.topology.nodes_manager.startup_nodes) == [
        "10.0.0.1:7000",
        "10.0.0.2:7001",
    ]
    # As in redis:// (redis-py's parse_url): ":pw@" a password alone, "me@" a user name alone.
    for login, expected in [(":pw", ("", "pw")), ("me", ("me", ""))]:
        alone = ClusterPipelinedRedis.from_url(f"redis+cluster://{login}@h:1", timeout_seconds=1.0)
        assert (alone.address.username, alone.address.password) == expected
    with pytest.raises(ValueError, match="host:port"):
        ClusterPipelinedRedis.from_url("redis+cluster://10.0.0.1", timeout_seconds=1.0)


def test_mixed_batch_over_many_slots_answers_in_order(redis_cluster: RedisClusterHarness) -> None:
    """Commands interleaved over 3 nodes (many runs): every SET lands before the GETs after it,
    error replies stay at their own place, and each reply is the one of its own command."""
    names = [f"{prefix}:k" for p in prefixes_by_primary(redis_cluster, 10).values() for prefix in p]
    names.sort(key=lambda name: uuid.uuid4().hex)  # nodes interleaved: many runs

    async def test(client: ClusterPipelinedRedis) -> None:
        commands: list[Command] = []
        expected: list[Reply] = []
        for number, name in enumerate(names):
            commands += [("SET", name, f"v{number}"), ("GET", name), ("INCR", name)]
            expected += [b"OK", f"v{number}".encode(), None]  # INCR on text: an error in place
        commands += [("GET", name) for name in reversed(names)]
        expected += [f"v{number}".encode() for number in reversed(range(len(names)))]
        replies = await client.execute_many(commands)
        assert len(replies) == len(expected)
        for command, reply, wanted in zip(commands, replies, expected, strict=True):
            if command[0] == "INCR":
                assert isinstance(reply, ResponseError), (command, reply)
            else:
                assert reply == wanted, (command, reply)
        # A run waits for the answer of the run before it on another node: the script on the
        # second node reads Redis's clock after the first node's BLPOP timed out.
        (first, *_), (second, *_), *_ = prefixes_by_primary(redis_cluster, 1).values()
        started = time.time()
        blocked, clock = await client.execute_many(
            [("BLPOP", f"{first}:empty", "0.3"), ("EVAL", "return redis.call('TIME')", 1, second)]
        )
        assert blocked is None and isinstance(clock, list)
        assert as_integer(clock[0]) + as_integer(clock[1]) / 1e6 >= started + 0.25
        # One node only: one run, the same answers.
        port, prefixes = next(iter(prefixes_by_primary(redis_cluster, 3).items()))
        single = [("SET", f"{p}:one", p) for p in prefixes] + [
            ("GET", f"{p}:one") for p in prefixes
        ]
        assert (await client.execute_many(single))[3:] == [p.encode() for p in prefixes]
        assert redis_cluster.node(port).command("GET", f"{prefixes[0]}:one") == prefixes[0]

    run(test, redis_cluster)


def test_scripts_carry_the_generation_and_are_checked_per_slot(
    redis_cluster: RedisClusterHarness,
) -> None:
    by_primary = prefixes_by_primary(redis_cluster, 4)

    async def test(client: ClusterPipelinedRedis) -> None:
        generation = HotStateGeneration()
        generation.value = "gen-a"
        client.generation = generation
        await client.execute("SET", keys.GENERATION, "gen-a|run")
        # Every hash slot's witness, as a rebuild of gen-a leaves them: its unused slots may be
        # marked.
        await client.execute_many(witness_commands("gen-a"))
        await client.load_script(STAMPED)
        marked, unmarked = [], []
        for prefixes in by_primary.values():
            marked += prefixes[:3]
            unmarked.append(prefixes[3])
        await client.execute_many([("SET", keys.generation_marker(p), "gen-a") for p in marked])
        every = marked + unmarked
        calls: list[Command] = [("EVALSHA", STAMPED.sha, 1, f"{p}:q:x", 5) for p in every]
        replies = await client.execute_many(calls)
        # Stamped: the script saw gen-a as its last argument; the unmarked slots were marked by
        # generation.resolve through the router (SET NX on their own nodes) and sent again.
        assert replies == [[b"5", b"gen-a"]] * len(every)
        for port, prefixes in by_primary.items():
            owner = redis_cluster.node(port)
            assert owner.command("GET", keys.generation_marker(prefixes[3])) == "gen-a"

        # A rebuild under way marks one slot per node with its generation: those refuse (the
        # write does not happen), the others still answer.
        await client.execute("SET", keys.GENERATION, "REBUILDING|gen-b")
        rebuilt = [prefixes[0] for prefixes in by_primary.values()]
        await client.execute_many([("SET", keys.generation_marker(p), "gen-b") for p in rebuilt])
        calls = [("EVALSHA", STAMPED.sha, 1, f"{p}:q:x", 6) for p in every]
        replies = await client.execute_many(calls)
        for prefix, reply in zip(every, replies, strict=True):
            if prefix in rebuilt:
                assert isinstance(reply, ResponseError) and str(reply).startswith("MWSTALE")
                assert await client.execute("HGET", f"{prefix}:q:x", "available") == b"5"
            else:
                assert reply == [b"6", b"gen-a"]
        assert generation.lost.is_set()
        client.generation = None
        await client.execute("DEL", keys.GENERATION)
        await client.execute_many([("DEL", keys.witness(s)) for s in range(keys.HASH_SLOTS)])

    run(test, redis_cluster)


def test_keyless_commands_go_through_primaries(redis_cluster: RedisClusterHarness) -> None:
    async def test(client: ClusterPipelinedRedis) -> None:
        for command in [("DBSIZE",), ("SCAN", 0), ("SCRIPT", "LOAD", "return 1"), ("PING",)]:
            with pytest.raises(ValueError, match=r"primaries\(\)"):
                await client.transmit([command])
        primaries = await client.primaries()
        assert len(primaries) == 3
        assert sorted(node.address.port for node in primaries) == sorted(
            redis_cluster.primary_ports()
        )
        assert all(node.generation is None for node in primaries)
        assert [id(node) for node in await client.primaries()] == [id(node) for node in primaries]
        sizes = [await node.execute("DBSIZE") for node in primaries]
        assert all(isinstance(size, int) for size in sizes)
        # A script loaded through the router is on every primary.
        script = Script(f"return '{uuid.uuid4().hex}'")
        await client.load_script(script)
        for port in redis_cluster.primary_ports():
            assert redis_cluster.node(port).command("SCRIPT", "EXISTS", script.sha) == [1]

    run(test, redis_cluster)


def test_a_moved_slot_is_followed(redis_cluster: RedisClusterHarness) -> None:
    by_primary = prefixes_by_primary(redis_cluster, 1)
    (source, (prefix,)), (target, (other,)), *_ = by_primary.items()
    slot = slot_of(prefix)

    async def test(client: ClusterPipelinedRedis) -> None:
        await client.execute_many([("SET", f"{prefix}:k", "before"), ("SET", f"{other}:k", "o")])
        assert client._owner(slot) == f"{HOST}:{source}"
        redis_cluster.move_slots(slot, slot, target)
        # The map is stale: the source answers MOVED, the router follows it, in order.
        replies = await client.execute_many(
            [("GET", f"{prefix}:k"), ("SET", f"{prefix}:k", "after"), ("GET", f"{prefix}:k"),
             ("GET", f"{other}:k")]
        )  # fmt: skip
        assert replies == [b"before", b"OK", b"after", b"o"]
        assert client._owner(slot) == f"{HOST}:{target}"
        assert redis_cluster.node(target).command("GET", f"{prefix}:k") == "after"

    run(test, redis_cluster)


def test_a_slot_mid_migration_is_followed_with_ask(redis_cluster: RedisClusterHarness) -> None:
    by_primary = prefixes_by_primary(redis_cluster, 1)
    (source_port, (prefix,)), (target_port, _), *_ = by_primary.items()
    source, target = redis_cluster.node(source_port), redis_cluster.node(target_port)
    slot = slot_of(prefix)
    stays, moves, new = f"{prefix}:stays", f"{prefix}:moves", f"{prefix}:new"

    async def test(client: ClusterPipelinedRedis) -> None:
        await client.execute_many([("SET", stays, "s"), ("SET", moves, "m")])
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        try:
            source.command("MIGRATE", HOST, target_port, "", 0, 5000, "KEYS", moves)
            # moves: ASK to the target; stays: answered by the source; new: ASK, created there.
            replies = await client.execute_many(
                [("GET", moves), ("GET", stays), ("SET", new, "n"), ("GET", new)]
            )
            assert replies == [b"m", b"s", b"OK", b"n"]
            # ASK does not move the slot in the map (MOVED would).
            assert client._owner(slot) == f"{HOST}:{source_port}"
            # Keys split between the two nodes: TRYAGAIN, retried a few times, then left in
            # place (no timing asserted: an event loop's timers may fire a little early).
            (split,) = await client.execute_many([("MGET", stays, moves)])
            assert isinstance(split, ResponseError) and str(split).startswith("TRYAGAIN")
        finally:  # the slot finishes its move whatever happened, for the module's next tests
            rest = source.command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if rest:
                source.command("MIGRATE", HOST, target_port, "", 0, 5000, "KEYS", *rest)
            for node in redis_cluster.nodes:
                if node.alive and redis_cluster.role(node) == "master":
                    node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
            redis_cluster.wait_until_ok()
        assert [target.command("GET", name) for name in (stays, moves, new)] == ["s", "m", "n"]
        assert await client.execute("GET", new) == b"n"

    run(test, redis_cluster)


def test_slots_moved_under_traffic_lose_and_repeat_nothing(
    redis_cluster: RedisClusterHarness,
) -> None:
    """INCRs from 16 callers while 30 slots move (ASK while a slot migrates, MOVED after): every
    INCR acknowledged ran exactly once, and none failed."""
    by_primary = prefixes_by_primary(redis_cluster, 1)
    (source_port, _), (target_port, _), *_ = by_primary.items()
    first, _ = redis_cluster.slots_of(source_port)[0]
    names: list[str] = []
    number = 0
    while len(names) < 90:  # three keys in each of the 30 slots moved
        name = f"traffic:{number}"
        if (
            first <= slot_of(name) < first + 30
            and sum(slot_of(other) == slot_of(name) for other in names) < 3
        ):
            names.append(name)
        number += 1

    async def test(client: ClusterPipelinedRedis) -> None:
        await client.execute_many([("DEL", name) for name in names])
        acknowledged = dict.fromkeys(names, 0)
        stop = asyncio.Event()

        async def caller(offset: int) -> None:
            index = offset
            while not stop.is_set():
                name = names[index % len(names)]
                assert await client.execute("INCR", name) == acknowledged[name] + 1
                acknowledged[name] += 1
                index += 7

        callers = [asyncio.ensure_future(caller(offset)) for offset in range(16)]
        await asyncio.to_thread(redis_cluster.move_slots, first, first + 29, target_port, 1)
        stop.set()
        await asyncio.gather(*callers)
        values = await client.execute_many([("GET", name) for name in names])
        assert values == [str(acknowledged[name]).encode() for name in names]
        assert sum(acknowledged.values()) > len(names)
        assert client._owner(first) == f"{HOST}:{target_port}"

    run(test, redis_cluster)


def test_a_command_that_timed_out_is_not_sent_again(redis_cluster: RedisClusterHarness) -> None:
    """Redis may run a command whose reply never came in time: the call fails, and the command
    runs once (when the node answers again), never twice."""
    (port, (prefix,)), *_ = prefixes_by_primary(redis_cluster, 1).items()
    name = f"{prefix}:once"

    # Writes, then keeps Redis busy past the client's timeout (0.2 s): Redis runs it to its end.
    # Busy for 0.5 s by the clock, not a count of loops: a node busy past cluster-node-timeout
    # (1 s here) is failed over by its replica, and the next test would find the topology
    # changing under it (a loaded machine once made 150M loops take that long).
    slow = Script(
        "redis.call('INCR', KEYS[1])\n"
        "local function now() local t = redis.call('TIME') return t[1] * 1e6 + t[2] end\n"
        "local deadline = now() + 500000\n"
        "while now() < deadline do end"
    )

    async def test(client: ClusterPipelinedRedis) -> None:
        await client.execute("DEL", name)
        await client.load_script(slow)
        impatient = ClusterPipelinedRedis.from_url(
            f"redis+cluster://{HOST}:{port}", timeout_seconds=0.2
        )
        try:
            with pytest.raises((TimeoutError, RedisError)):
                await impatient.evalsha(slow, [name], [])
        finally:
            await impatient.aclose()
        # The node's GET waits for the script to end.
        assert redis_cluster.node(port).command("GET", name) == "1"
        assert await client.execute("GET", name) == b"1"

    run(test, redis_cluster)
    assert redis_cluster.role(redis_cluster.node(port)) == "master", "failed over while busy"


def test_a_killed_primary_fails_its_slots_until_its_replica_is_promoted(
    redis_cluster: RedisClusterHarness,
) -> None:
    by_primary = prefixes_by_primary(redis_cluster, 2)
    victim, *others = by_primary
    dead = [f"{prefix}:k" for prefix in by_primary[victim]]
    alive = [f"{prefix}:k" for port in others for prefix in by_primary[port]]
    script = Script(f"-- {uuid.uuid4().hex}\nreturn redis.call('GET', KEYS[1])", "get")

    async def test(client: ClusterPipelinedRedis) -> None:
        await client.execute_many([("SET", name, name) for name in dead + alive])
        assert await client.evalsha(script, [dead[0]], []) == dead[0].encode()
        redis_cluster.wait_for_replication()
        redis_cluster.kill_primary(victim)
        promotion = asyncio.ensure_future(
            asyncio.to_thread(redis_cluster.wait_for_promotion, victim)
        )
        failures = answers = 0
        while not promotion.done():
            for name in alive:  # other shards: always answered, right
                assert await client.execute("GET", name) == name.encode()
            for name in dead:  # its shard: an error, or (once promoted) the right value
                try:
                    reply = await client.execute("GET", name)
                except RedisError:
                    failures += 1
                else:
                    answers += 1
                    assert reply == name.encode()
            try:  # a batch over the dead shard fails as a whole, or answers right
                replies = await client.execute_many([("GET", alive[0]), ("GET", dead[0])])
            except RedisError:
                failures += 1
            else:
                assert replies == [alive[0].encode(), dead[0].encode()]
            await asyncio.sleep(0.05)
        promoted = await promotion
        assert failures > 0
        # The promoted replica never loaded the script (made sure: its cache is flushed).
        redis_cluster.node(promoted).command("SCRIPT", "FLUSH")
        deadline = time.monotonic() + 15.0  # generous: a loaded CI machine
        while True:  # the same client, no refresh asked: back within a few tries
            try:
                replies = await client.execute_many([("GET", name) for name in dead + alive])
                break
            except RedisError:
                assert time.monotonic() < deadline, "the client did not recover"
                await asyncio.sleep(0.05)
        assert replies == [name.encode() for name in dead + alive]
        assert await client.evalsha(script, [dead[1]], []) == dead[1].encode()
        assert redis_cluster.node(promoted).command("SCRIPT", "EXISTS", script.sha) == [1]
        assert sorted(node.address.port for node in await client.primaries()) == sorted(
            redis_cluster.primary_ports()
        )

    run(test, redis_cluster)
