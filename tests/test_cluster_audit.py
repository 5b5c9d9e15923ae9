"""Audit of the cluster router in the light of how the service uses it (real 3+3 cluster,
tests/redis_cluster.py): what a slot being resharded does to scripts, and what a redirected
command does to the order callers rely on."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import pytest

from authz_server.domain.errors import Unavailable
from authz_server.service.ports import AuthorizeCall
from authz_server.storage.redis import keys, quota_io, script_io
from authz_server.storage.redis.cluster import ClusterPipelinedRedis
from authz_server.storage.redis.generation import HotStateGeneration
from authz_server.storage.redis.hold_store import HoldStore
from authz_server.storage.redis.pipelined import Command, Reply
from authz_server.storage.redis.quota_cache import RedisQuotaCache
from tests.redis_cluster import HOST, RedisClusterHarness, cluster_fixture, slot_of

pytestmark = pytest.mark.backend_neutral

redis_cluster = cluster_fixture()
GENERATION = "gen-audit"


def run(
    test: Callable[[ClusterPipelinedRedis], Awaitable[None]], cluster: RedisClusterHarness
) -> None:
    async def body() -> None:
        seeds = ",".join(f"{HOST}:{port}" for port in cluster.primary_ports()[:2])
        client = ClusterPipelinedRedis.from_url(f"redis+cluster://{seeds}", timeout_seconds=2.0)
        generation = HotStateGeneration()
        generation.value = GENERATION
        client.generation = generation
        try:
            await test(client)
        finally:
            await client.aclose()

    asyncio.run(body())


def beneficiary_on(cluster: RedisClusterHarness, port: int) -> str:
    """A fresh beneficiary id whose slot the primary `port` serves."""
    spans = cluster.slots_of(port)
    while True:
        beneficiary = f"ben-{uuid.uuid4().hex[:12]}"
        slot = slot_of(keys.prefix(beneficiary))
        if any(a <= slot <= b for a, b in spans):
            return beneficiary


def medicine_call(
    authorization_id: str, merchant: str, beneficiary: str, key: str, fen: int, now_ms: int
) -> AuthorizeCall:
    """An Authorize of `fen` for medicine, any of the beneficiary's quotas, held 10 minutes."""
    return AuthorizeCall(
        authorization_id=authorization_id,
        merchant_id=merchant,
        beneficiary_id=beneficiary,
        idempotency_key=key,
        purpose="MEDICINE",
        request_digest="d",
        eligible_fen=fen,
        allow_partial=False,
        relationship_id="",
        expires_at_ms=now_ms + 600_000,
        decided_decline="",
        capture_at_once=False,
        requires_resident=False,
        template="",
        requested_fen=fen,
    )


def pending_hold(beneficiary: str, merchant: str, now_ms: int) -> tuple[str, list[Command]]:
    """An authorization id and the commands that write its open hold of 500 fen on quota r1
    (as authorize.lua leaves it), with the slot marked by GENERATION."""
    prefix = keys.prefix(beneficiary)
    authorization_id = keys.new_authorization_id(beneficiary)
    expires = now_ms + 600_000
    return authorization_id, [
        ("SET", keys.GENERATION, f"{GENERATION}|run"),
        ("SET", keys.generation_marker(prefix), GENERATION),
        ("HSET", f"{prefix}:q:r1", "status", "ACTIVE", "available", 500, "held", 500,
         "beneficiary", beneficiary, "scheme", "RESIDENT", "order", 1),
        ("ZADD", keys.quota_index(beneficiary), 1, "r1"),
        ("SADD", f"{prefix}:qh:r1", authorization_id),
        ("HSET", keys.authorization(authorization_id), "m", merchant, "b", beneficiary,
         "p", "MEDICINE", "s", "PENDING", "ap", 500, "cp", 0, "f", "r1=500", "ex", expires,
         "cr", now_ms, "d", "APPROVED", "r", "", "ck", "", "o", 0),
        ("ZADD", keys.expiry(prefix), expires, authorization_id),
    ]  # fmt: skip


def test_a_capture_on_a_slot_being_migrated_writes_all_or_nothing(
    redis_cluster: RedisClusterHarness,
) -> None:
    """Between CLUSTER SETSLOT MIGRATING and the MIGRATE of the slot's keys (every reshard has
    this window, even when the slot moves in one MIGRATE), every key of the slot is still on
    the source, so capture_begin.lua runs there. Its slot has no capture in flight, so
    `prefix:capturing` does not exist: Redis refuses the script's access to that undeclared,
    missing key in a MIGRATING slot ("Script attempted to access a non local key"), after the
    script already set the hold CAPTURING and took it out of the expiry index. A refused call
    must leave the hold as it was (PENDING, in the expiry index), or the hold is lost to the
    sweeper: never expired, never settled, its money held until a rebuild."""
    source_port, target_port, *_ = redis_cluster.primary_ports()
    source, target = redis_cluster.node(source_port), redis_cluster.node(target_port)
    beneficiary = beneficiary_on(redis_cluster, source_port)
    prefix = keys.prefix(beneficiary)
    slot = slot_of(prefix)
    now_ms = int(time.time() * 1000)
    authorization_id, writes = pending_hold(beneficiary, "m-1", now_ms)
    auth = keys.authorization(authorization_id)

    async def test(client: ClusterPipelinedRedis) -> None:
        holds = HoldStore(client)
        await client.load_script(script_io.CaptureBegin.SCRIPT)
        for reply in await client.execute_many(writes):
            assert not isinstance(reply, Exception), reply
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        try:
            try:
                claim = await holds.capture_begin(authorization_id, "m-1", "cap-1", 0, now_ms)
            except Unavailable:
                # Refused: nothing of the claim may have been written.
                assert source.command("HGET", auth, "s") == "PENDING"
                assert source.command("ZSCORE", keys.expiry(prefix), authorization_id) is not None
            else:
                assert claim.outcome == "OK"
                assert source.command("ZSCORE", f"{prefix}:capturing", authorization_id)
        finally:
            for node in (source, target):
                node.command("CLUSTER", "SETSLOT", slot, "STABLE")
            await client.execute_many([("DEL", auth), ("DEL", keys.expiry(prefix))])

    run(test, redis_cluster)


def test_resolve_reads_the_marker_after_its_marks_even_when_a_mark_is_redirected(
    redis_cluster: RedisClusterHarness,
) -> None:
    """generation.resolve marks an unused slot (SET NX), then reads keys.GENERATION again "after
    the marks": a rebuild that began before the marks landed must be seen (resolve answers
    False), or the slot keeps the old generation's mark while the rebuild sweeps Redis, and the
    refused call is sent again into a slot being rebuilt. Here the mark's slot is mid-migration
    on the node that also serves keys.GENERATION: the SET NX is answered ASK, and the router
    follows it only after the GET of the same run has run. A rebuild begins exactly then (the
    hook stands for another server publishing REBUILDING): the GET must not have run yet."""
    generation_port = redis_cluster.owner_of_slot(slot_of(keys.GENERATION))
    target_port = next(p for p in redis_cluster.primary_ports() if p != generation_port)
    source, target = redis_cluster.node(generation_port), redis_cluster.node(target_port)
    prefix = keys.prefix(beneficiary_on(redis_cluster, generation_port))
    marker, slot = keys.generation_marker(prefix), slot_of(prefix)

    async def test(client: ClusterPipelinedRedis) -> None:
        from redis.exceptions import ResponseError

        await client.execute("SET", keys.GENERATION, f"{GENERATION}|run")
        # The slot's witness, as the rebuild of GENERATION left it: resolve reads it on the
        # source (it is there) before the mark, which the source answers ASK (it is not).
        await client.execute("SET", keys.witness(slot), GENERATION)
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        follow = client._redirected
        began: list[bool] = []

        async def rebuild_begins_then_follow(command, reply):  # type: ignore[no-untyped-def]
            if not began:
                began.append(True)
                source.command("SET", keys.GENERATION, "REBUILDING|gen-next")
            return await follow(command, reply)

        client._redirected = rebuild_begins_then_follow  # type: ignore[method-assign]
        try:
            assert client.generation is not None
            again = await client.generation.resolve(client, [ResponseError(f"MWUNMARKED {marker}")])
            assert began, "the mark was not redirected: the test did not test anything"
            assert again is False
            assert client.generation.lost.is_set()
        finally:
            client._redirected = follow  # type: ignore[method-assign]
            asking = target.client().pipeline(transaction=False)
            asking.execute_command("ASKING")  # type: ignore[no-untyped-call]
            asking.execute_command("DEL", marker)  # type: ignore[no-untyped-call]
            asking.execute(raise_on_error=False)
            for node in (source, target):
                node.command("CLUSTER", "SETSLOT", slot, "STABLE")
            source.command("DEL", keys.GENERATION)
            source.command("DEL", keys.witness(slot))

    run(test, redis_cluster)


def test_a_restored_hold_is_never_decided_on_a_half_moved_slot(
    redis_cluster: RedisClusterHarness,
) -> None:
    """`redis-cli --cluster reshard` moves a slot's keys `--cluster-pipeline` (default 10) at a
    time. Once some have moved, a script whose declared keys are all new on the source
    (hold_restore.lua: the authorization hash) is answered ASK and, followed with ASKING, runs
    on the importing node, where Redis lets it read the slot's undeclared keys that have not
    moved yet as missing. Here the marker has moved and the quota hash has not: hold_restore
    reads quota r1 as not ACTIVE and answers 0, "nothing to restore", for an approved hold SQL
    has: the hold is lost from Redis and its money offered again. A script must not be decided
    on a half-moved slot: refused (UNAVAILABLE, retried later) or placed, never 0."""
    from datetime import UTC, datetime, timedelta

    from authz_server.domain.hot_state import OpenHold

    source_port, target_port, *_ = redis_cluster.primary_ports()
    source, target = redis_cluster.node(source_port), redis_cluster.node(target_port)
    beneficiary = beneficiary_on(redis_cluster, source_port)
    prefix = keys.prefix(beneficiary)
    slot = slot_of(prefix)
    now = datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    authorization_id, writes = pending_hold(beneficiary, "m-2", now_ms)
    hold = OpenHold(
        authorization_id=authorization_id,
        merchant_id="m-2",
        beneficiary_id=beneficiary,
        purpose="MEDICINE",
        decision="APPROVED",
        approved_fen=500,
        funding=(("r1", 500),),
        created_at=now,
        expires_at=now + timedelta(minutes=10),
    )
    # Redis lost the hold (what restore_hold is for): the slot has the quota and the marker.
    writes = [command for command in writes if ":a:" not in str(command[1])]
    writes = [command for command in writes if not str(command[1]).endswith((":expiry", ":qh:r1"))]

    async def test(client: ClusterPipelinedRedis) -> None:
        holds = HoldStore(client)
        await client.load_script(script_io.HoldRestore.SCRIPT)
        for reply in await client.execute_many(writes):
            assert not isinstance(reply, Exception), reply
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        # A first MIGRATE batch took the marker; the quota hash waits for the next one.
        marker = keys.generation_marker(prefix)
        source.command("MIGRATE", HOST, target_port, "", 0, 5000, "KEYS", marker)
        try:
            try:
                placed = await holds.restore_hold(hold, now_ms)
            except Unavailable:
                placed = None
            assert placed is not False, "an approved hold SQL has was dropped, not restored"
        finally:
            rest = source.command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            assert isinstance(rest, list)
            if rest:
                source.command("MIGRATE", HOST, target_port, "", 0, 5000, "REPLACE", "KEYS", *rest)
            for node in redis_cluster.nodes:
                if node.alive and redis_cluster.role(node) == "master":
                    node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
            redis_cluster.wait_until_ok()

    run(test, redis_cluster)


def test_a_shard_that_lost_its_data_is_not_taken_for_unused_slots(
    redis_cluster: RedisClusterHarness,
) -> None:
    """On one node, losing the data loses keys.GENERATION with it, so generation.resolve sees
    the hot state lost. On a cluster keys.GENERATION lives on one shard only: another shard
    that lost its data (FLUSHALL here; a primary restarted empty at its address, or a replica
    promoted that never had the slot's marker) answers MWUNMARKED, resolve reads a complete
    generation on the marker's shard and marks the emptied slot as "never used", and the call
    is decided on nothing: the beneficiary's quota is gone, the payment declined
    RELATIONSHIP_NOT_FOUND. It must be refused (UNAVAILABLE) until the hot state is rebuilt:
    the slot's witness (keys.witness, written by the rebuild on the slot's node) went with the
    shard's data, so resolve finds the shard lost and takes keys.GENERATION away."""

    generation_port = redis_cluster.owner_of_slot(slot_of(keys.GENERATION))
    other_port = next(p for p in redis_cluster.primary_ports() if p != generation_port)
    other = redis_cluster.node(other_port)
    beneficiary = beneficiary_on(redis_cluster, other_port)
    now_ms = int(time.time() * 1000)
    _, writes = pending_hold(beneficiary, "m-3", now_ms)
    writes = [command for command in writes if command[0] in ("SET", "ZADD", "HSET")]
    # As a rebuild of GENERATION left it: the slot's witness on the same shard.
    writes.append(("SET", keys.witness(slot_of(keys.prefix(beneficiary))), GENERATION))
    call = medicine_call(
        keys.new_authorization_id(beneficiary), "m-3", beneficiary, f"k-{uuid.uuid4().hex[:8]}",
        100, now_ms,
    )  # fmt: skip

    async def test(client: ClusterPipelinedRedis) -> None:
        holds = HoldStore(client)
        for reply in await client.execute_many(writes):
            assert not isinstance(reply, Exception), reply
        other.command("FLUSHALL")  # the shard's data is gone; keys.GENERATION is elsewhere
        await client.load_script(script_io.Authorize.SCRIPT)
        try:
            decision = await holds.authorize(call, now_ms)
        except Unavailable:
            decision = None
        assert decision is None or decision.decline_reason != "RELATIONSHIP_NOT_FOUND", (
            "decided on a shard that lost its data"
        )
        assert decision is None, decision
        # Every server's guardian now finds the hot state lost (and one rebuilds it).
        assert client.generation is not None and client.generation.lost.is_set()
        assert await client.execute("GET", keys.GENERATION) is None

    run(test, redis_cluster)


def test_an_undo_on_a_slot_being_migrated_gives_the_money_back_once(
    redis_cluster: RedisClusterHarness,
) -> None:
    """authorize_undo.lua gives the hold's money back to its quota, then takes the hold out of
    the slot's `:capturing` zset, which does not exist when no capture is in flight: on a slot
    being migrated Redis refuses that access after the money went back, the hold stays PENDING
    and in the expiry index, and its expiry gives the same money back a second time (the quota
    overstated: over-quota approvals). Refused, an undo must have given nothing back."""
    source_port, target_port, *_ = redis_cluster.primary_ports()
    source, target = redis_cluster.node(source_port), redis_cluster.node(target_port)
    beneficiary = beneficiary_on(redis_cluster, source_port)
    prefix = keys.prefix(beneficiary)
    slot = slot_of(prefix)
    now_ms = int(time.time() * 1000)
    authorization_id, writes = pending_hold(beneficiary, "m-4", now_ms)

    call = medicine_call(authorization_id, "m-4", beneficiary, "k-undo", 500, now_ms)
    idempotency = keys.idempotency(beneficiary, "m-4", "k-undo")
    writes.append(("HSET", idempotency, "a", authorization_id, "digest", "d"))

    async def test(client: ClusterPipelinedRedis) -> None:
        holds = HoldStore(client)
        await client.load_script(script_io.AuthorizeUndo.SCRIPT)
        for reply in await client.execute_many(writes):
            assert not isinstance(reply, Exception), reply
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        try:
            try:
                await holds.undo(call, authorization_id)
            except Unavailable:
                # Refused: nothing given back, the hold as it was.
                assert source.command("HGET", f"{prefix}:q:r1", "available") == "500"
                assert source.command("HGET", keys.authorization(authorization_id), "s")
            else:
                assert source.command("HGET", f"{prefix}:q:r1", "available") == "1000"
                assert source.command("EXISTS", keys.authorization(authorization_id)) == 0
        finally:
            for node in (source, target):
                node.command("CLUSTER", "SETSLOT", slot, "STABLE")

    run(test, redis_cluster)


def test_a_decision_keeps_its_scripts_generation_when_a_newer_one_is_adopted_meanwhile(
    redis_cluster: RedisClusterHarness,
) -> None:
    """On a cluster an Authorize's batch goes in runs, one node after another: the script on the
    beneficiary's node, then the key claim on another. Another call of this process adopting a
    newer generation while the later runs are pending (a rebuild published it) must not relabel
    the decision: it was made under the script's generation, and the journal refuses it under
    the newer one (storage/redis/pipelined.py `stamps`)."""
    first, second, *_ = redis_cluster.primary_ports()
    beneficiary = beneficiary_on(redis_cluster, first)
    spans = redis_cluster.slots_of(second)
    while True:  # a key whose merchant-wide claim lives on the other node
        key = f"key-{uuid.uuid4().hex[:12]}"
        claim_slot = slot_of(keys.idempotency_claim("m-gen", key))
        if any(a <= claim_slot <= b for a, b in spans):
            break
    now_ms = int(time.time() * 1000)

    async def test(client: ClusterPipelinedRedis) -> None:
        await client.load_script(script_io.Authorize.SCRIPT)
        await client.execute_many(
            [("SET", keys.generation_marker(keys.prefix(beneficiary)), GENERATION)]
        )
        original = client._run

        async def then_adopt(name: str, commands: Sequence[Command]) -> list[Reply]:
            replies = await original(name, commands)
            if any(command[0] == "EVALSHA" for command in commands):
                assert client.generation is not None
                client.generation.adopt("gen-newer", "")  # another call, meanwhile
            return replies

        client._run = then_adopt  # type: ignore[method-assign]
        call = medicine_call(
            keys.new_authorization_id(beneficiary), "m-gen", beneficiary, key, 100, now_ms
        )
        decision = await HoldStore(client).authorize(call, now_ms)
        assert decision is not None and decision.generation == GENERATION
        assert client.generation is not None and client.generation.value == "gen-newer"

    run(test, redis_cluster)


def test_a_dissolution_on_a_slot_being_migrated_writes_all_or_nothing(
    redis_cluster: RedisClusterHarness,
) -> None:
    """quota_dissolve.lua reads whether a hold put back from SQL (rs = 1) waits for the
    sweeper's settlement (`prefix:capturing`, missing when nothing is listed): in a MIGRATING
    slot Redis refuses access to that missing key. Read after the script's first write, the
    refusal left the quota dissolved, its hold neither voided nor out of the hold set; every key
    is read first now, so a refused call writes nothing."""
    source_port, target_port, *_ = redis_cluster.primary_ports()
    source, target = redis_cluster.node(source_port), redis_cluster.node(target_port)
    beneficiary = beneficiary_on(redis_cluster, source_port)
    prefix = keys.prefix(beneficiary)
    slot = slot_of(prefix)
    now_ms = int(time.time() * 1000)
    authorization_id, writes = pending_hold(beneficiary, "m-1", now_ms)
    auth = keys.authorization(authorization_id)
    quota = f"{prefix}:q:r1"
    writes.append(("HSET", auth, "rs", 1))  # put back by hold_restore.lua: not listed

    async def test(client: ClusterPipelinedRedis) -> None:
        quotas = RedisQuotaCache(client)
        await client.load_script(quota_io.QuotaDissolve.SCRIPT)
        for reply in await client.execute_many(writes):
            assert not isinstance(reply, Exception), reply
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        try:
            try:
                await quotas.dissolve(beneficiary, "r1")
            except Unavailable:  # refused: nothing written
                assert source.command("HGET", quota, "status") == "ACTIVE"
                assert source.command("HGET", auth, "s") == "PENDING"
            else:  # all of it
                assert source.command("HGET", quota, "status") == "DISSOLVED"
                assert source.command("HGET", auth, "s") == "VOIDED"
        finally:
            for node in (source, target):
                node.command("CLUSTER", "SETSLOT", slot, "STABLE")
            await client.execute_many([("DEL", auth), ("DEL", keys.expiry(prefix)), ("DEL", quota)])

    run(test, redis_cluster)
