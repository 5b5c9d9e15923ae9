"""The hold sweeper finds its work through indexes, not a SCAN of every key each second
(storage/redis/hold_store.py, sweeper.py): a hold in a slot nobody touches again expires through
the due index; a hold whose index entry was lost (a crash between the script and the index
write) through the safety net; stalled captures through the capture index. Storage-level tests
run on a private redis-server with the real scripts; the last one runs through the service."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.service.ports import AuthorizeCall, Finish, QuotaRestore
from authz_server.storage.redis import keys
from authz_server.storage.redis.generation import HotStateGeneration
from authz_server.storage.redis.hold_store import HoldStore
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.quota_cache import RedisQuotaCache
from authz_server.storage.redis.sweep_store import STALE_CAPTURE_SECONDS, SWEEP_LIMIT, SweepStore
from authz_server.storage.redis.sweeper import HoldSweeper
from tests.harness import Harness
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    family,
    figures,
    register_merchants,
    wait_for,
)

T = TypeVar("T")

NOW_MS = 1_800_000_000_000
MINUTE_MS = 60_000


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("sweeper") / "redis", persistent=False)
    yield server.start()
    server.stop()


@dataclass
class Store:
    holds: HoldStore
    quotas: RedisQuotaCache
    admin: Redis
    sweeps: SweepStore

    async def quota(self, fen: int) -> tuple[str, str]:
        """A new beneficiary (in a slot of its own) with one active quota of `fen`."""
        beneficiary_id, relationship_id = f"b-{uuid.uuid4().hex}", f"r-{uuid.uuid4().hex}"
        # The slot's witness, as a rebuild of the generation leaves it (not all 16384: the
        # safety net's tests count on a keyspace one round scans whole).
        witness = keys.witness(keys.slot(keys.prefix(beneficiary_id)))
        await self.admin.set(witness, "test-generation")
        await self.quotas.restore(
            QuotaRestore(relationship_id, beneficiary_id, "holder", True, fen, 1, "EMPLOYEE", 0)
        )
        return beneficiary_id, relationship_id

    async def hold(self, beneficiary_id: str, fen: int, expires_at_ms: int) -> str:
        call = AuthorizeCall(
            authorization_id=keys.new_authorization_id(beneficiary_id),
            merchant_id="sweeper-merchant",
            beneficiary_id=beneficiary_id,
            idempotency_key=uuid.uuid4().hex,
            purpose="MEDICAL_OUT_OF_POCKET",
            request_digest=uuid.uuid4().hex,
            eligible_fen=fen,
            allow_partial=False,
            relationship_id="",
            expires_at_ms=expires_at_ms,
            decided_decline="",
            capture_at_once=False,
            requires_resident=False,
            template="",
            requested_fen=fen,
        )
        decision = await self.holds.authorize(call, NOW_MS)
        assert decision is not None and decision.status == "PENDING", decision
        return decision.authorization_id

    async def figures(self, beneficiary_id: str, relationship_id: str) -> tuple[int, int]:
        found = (await self.quotas.figures(beneficiary_id, [relationship_id]))[relationship_id]
        return found.available_fen, found.held_fen

    async def status(self, authorization_id: str) -> str:
        hold = await self.holds.get(authorization_id)
        assert hold is not None
        return hold.status

    async def due_score(self, index: str, beneficiary_id: str) -> float | None:
        return await self.admin.zscore(index, keys.prefix(beneficiary_id))


def run(redis_url: str, body: Callable[[Store], Awaitable[T]]) -> T:
    async def main() -> T:
        admin = Redis.from_url(redis_url)
        await admin.flushall()  # each test sees only its own slots
        # A complete hot state (nothing in it yet): its slots are marked as they are first used.
        await admin.set(keys.GENERATION, "test-generation|test-run")
        commands = PipelinedRedis.from_url(redis_url, timeout_seconds=2)
        commands.generation = HotStateGeneration()
        store = Store(
            HoldStore(commands), RedisQuotaCache(commands), admin,
            SweepStore(commands),
        )  # fmt: skip
        try:
            return await body(store)
        finally:
            await commands.aclose()
            await admin.aclose()

    return asyncio.run(main())


def test_a_hold_nobody_touches_again_expires_through_the_due_index(redis_url: str) -> None:
    async def body(store: Store) -> None:
        beneficiary_id, relationship_id = await store.quota(10_000)
        expires_ms = NOW_MS + MINUTE_MS
        held = await store.hold(beneficiary_id, 4_000, expires_ms)
        later, _ = await store.quota(10_000)  # another slot, due later: left alone
        await store.hold(later, 1_000, expires_ms + MINUTE_MS)
        assert await store.due_score(keys.DUE_HOLDS, beneficiary_id) == expires_ms

        assert await store.sweeps.sweep_due(expires_ms - 1) == 0
        assert await store.status(held) == "PENDING"
        assert await store.sweeps.sweep_due(expires_ms) == 1
        assert await store.status(held) == "EXPIRED"
        assert await store.figures(beneficiary_id, relationship_id) == (10_000, 0)
        # Nothing left in that slot: its entry is gone; the other slot's stays as it was.
        assert await store.due_score(keys.DUE_HOLDS, beneficiary_id) is None
        assert await store.due_score(keys.DUE_HOLDS, later) == expires_ms + MINUTE_MS

    run(redis_url, body)


def test_a_slot_entry_moves_on_to_the_slots_next_expiry(redis_url: str) -> None:
    async def body(store: Store) -> None:
        beneficiary_id, relationship_id = await store.quota(10_000)
        first = await store.hold(beneficiary_id, 1_000, NOW_MS + MINUTE_MS)
        second = await store.hold(beneficiary_id, 2_000, NOW_MS + 3 * MINUTE_MS)
        assert await store.due_score(keys.DUE_HOLDS, beneficiary_id) == NOW_MS + MINUTE_MS
        assert await store.sweeps.sweep_due(NOW_MS + 2 * MINUTE_MS) == 1
        assert (await store.status(first), await store.status(second)) == ("EXPIRED", "PENDING")
        assert await store.due_score(keys.DUE_HOLDS, beneficiary_id) == NOW_MS + 3 * MINUTE_MS
        assert await store.figures(beneficiary_id, relationship_id) == (8_000, 2_000)

    run(redis_url, body)


def test_a_hold_whose_index_entry_was_lost_expires_through_the_safety_net(
    redis_url: str,
) -> None:
    async def body(store: Store) -> None:
        beneficiary_id, relationship_id = await store.quota(10_000)
        expires_ms = NOW_MS + MINUTE_MS
        held = await store.hold(beneficiary_id, 4_000, expires_ms)
        # A crash between authorize.lua and its index write.
        await store.admin.zrem(keys.DUE_HOLDS, keys.prefix(beneficiary_id))

        assert await store.sweeps.sweep_due(expires_ms) == 0  # the due sweep never scans
        assert await store.status(held) == "PENDING"
        sweeper = HoldSweeper(store.sweeps, 1.0)
        first = await sweeper.sweep(expires_ms)  # the safety net puts the entry back ...
        assert first.expired == 0 and first.open_holds is not None and first.open_holds >= 1
        assert await store.due_score(keys.DUE_HOLDS, beneficiary_id) == expires_ms
        second = await sweeper.sweep(expires_ms)  # ... and the next round takes it
        assert second.expired >= 1
        assert await store.status(held) == "EXPIRED"
        assert await store.figures(beneficiary_id, relationship_id) == (10_000, 0)

    run(redis_url, body)


def test_a_hold_put_back_after_a_failed_capture_is_swept_again(redis_url: str) -> None:
    """Capture claims the hold (it leaves the slot's expiry zset); SQL fails; the hold is put
    back PENDING with its old expiry, which may have passed meanwhile."""

    async def body(store: Store) -> None:
        beneficiary_id, relationship_id = await store.quota(10_000)
        expires_ms = NOW_MS + MINUTE_MS
        held = await store.hold(beneficiary_id, 4_000, expires_ms)
        claim = await store.holds.capture_begin(held, "sweeper-merchant", "c1", 0, NOW_MS)
        assert claim.outcome == "OK"
        assert await store.sweeps.sweep_due(expires_ms + 1) == 0  # nothing to expire: claimed
        assert await store.due_score(keys.DUE_HOLDS, beneficiary_id) is None
        await store.holds.capture_finish(held, "", Finish.PENDING, "")
        assert await store.due_score(keys.DUE_HOLDS, beneficiary_id) == 0  # look at once
        assert await store.sweeps.sweep_due(expires_ms + 2) == 1
        assert await store.status(held) == "EXPIRED"
        assert await store.figures(beneficiary_id, relationship_id) == (10_000, 0)

    run(redis_url, body)


def test_more_due_holds_than_one_script_call_expires_go_in_one_sweep(redis_url: str) -> None:
    async def body(store: Store) -> None:
        count = SWEEP_LIMIT + 100
        beneficiary_id, relationship_id = await store.quota(count)
        await asyncio.gather(
            *(store.hold(beneficiary_id, 1, NOW_MS + MINUTE_MS) for _ in range(count))
        )
        assert await store.figures(beneficiary_id, relationship_id) == (0, count)
        assert await store.sweeps.sweep_due(NOW_MS + MINUTE_MS) == count
        assert await store.figures(beneficiary_id, relationship_id) == (count, 0)

    run(redis_url, body)


def test_the_full_sweep_expires_everything_due_and_repairs_the_index(redis_url: str) -> None:
    """HoldStore.sweep (tests and tools): every slot, index or not."""

    async def body(store: Store) -> None:
        crowded, crowded_relationship = await store.quota(1_000)
        await asyncio.gather(
            *(store.hold(crowded, 1, NOW_MS + MINUTE_MS) for _ in range(SWEEP_LIMIT * 3))
        )
        beneficiary_id, _ = await store.quota(10_000)
        await store.hold(beneficiary_id, 1_000, NOW_MS + MINUTE_MS)
        await store.hold(beneficiary_id, 1_000, NOW_MS + 3 * MINUTE_MS)
        await store.admin.delete(keys.DUE_HOLDS)
        expired, still_open = await store.sweeps.sweep(NOW_MS + 2 * MINUTE_MS)
        assert (expired, still_open) == (SWEEP_LIMIT * 3 + 1, 1)
        assert await store.figures(crowded, crowded_relationship) == (1_000, 0)
        assert await store.due_score(keys.DUE_HOLDS, beneficiary_id) == NOW_MS + 3 * MINUTE_MS
        assert await store.due_score(keys.DUE_HOLDS, crowded) is None

    run(redis_url, body)


def test_stalled_captures_are_found_through_the_capture_index(redis_url: str) -> None:
    stale_ms = STALE_CAPTURE_SECONDS * 1000

    async def body(store: Store) -> None:
        beneficiary_id, _ = await store.quota(10_000)
        held = await store.hold(beneficiary_id, 4_000, NOW_MS + 10 * MINUTE_MS)
        begun_ms = NOW_MS + 1_000
        claim = await store.holds.capture_begin(held, "sweeper-merchant", "c1", 0, begun_ms)
        assert claim.outcome == "OK"
        assert await store.due_score(keys.CAPTURES_BEGUN, beneficiary_id) == begun_ms
        assert await store.sweeps.stalled_captures_due(begun_ms + stale_ms - 1, stale_ms) == []
        assert await store.sweeps.stalled_captures_due(begun_ms + stale_ms, stale_ms) == [held]
        # Still stalled until it is settled: found again.
        assert await store.sweeps.stalled_captures_due(begun_ms + stale_ms, stale_ms) == [held]
        await store.holds.capture_finish(held, "", Finish.CAPTURED, "")
        assert await store.sweeps.stalled_captures_due(begun_ms + stale_ms, stale_ms) == []
        assert await store.due_score(keys.CAPTURES_BEGUN, beneficiary_id) is None

        # A lost index entry: the safety net puts it back.
        other = await store.hold(beneficiary_id, 1_000, NOW_MS + 10 * MINUTE_MS)
        await store.holds.capture_begin(other, "sweeper-merchant", "c2", 0, begun_ms)
        await store.admin.zrem(keys.CAPTURES_BEGUN, keys.prefix(beneficiary_id))
        assert await store.sweeps.stalled_captures_due(begun_ms + stale_ms, stale_ms) == []
        sweeper = HoldSweeper(store.sweeps, 1.0)
        await sweeper.sweep(begun_ms + stale_ms)  # the safety net ...
        report = await sweeper.sweep(begun_ms + stale_ms)  # ... then the capture index
        assert other in report.stalled_captures

    run(redis_url, body)


def test_no_hold_is_missed_while_sweeps_and_authorizations_interleave(redis_url: str) -> None:
    """Holds placed while the sweeper removes and puts back index entries of the same slots:
    once the clock is past every expiry, the due index alone has expired every hold."""

    async def body(store: Store) -> None:
        families = [await store.quota(1_000_000) for _ in range(300)]
        horizon_ms = 4_000
        placed = 0
        expired = 0
        sweeping = True

        async def place(number: int) -> None:
            nonlocal placed
            await asyncio.sleep(random.random() / 2)  # while the sweeper runs
            beneficiary_id, _ = families[number % len(families)]
            await store.hold(beneficiary_id, 1, NOW_MS + random.randint(1, horizon_ms))
            placed += 1

        async def sweep() -> None:
            nonlocal expired
            now_ms = NOW_MS
            while sweeping:
                expired += await store.sweeps.sweep_due(now_ms)
                # Half way at most: holds still open at the end put the index to the test.
                now_ms = min(now_ms + 10, NOW_MS + horizon_ms // 2)
                await asyncio.sleep(0)

        sweeper = asyncio.ensure_future(sweep())
        await asyncio.gather(*(place(number) for number in range(1_500)))
        sweeping = False
        await sweeper
        # The index's promise: every slot with open holds is due no later than its first one.
        for beneficiary_id, _ in families:
            prefix = keys.prefix(beneficiary_id)
            first = await store.admin.zrange(keys.expiry(prefix), 0, 0, withscores=True)
            if first:
                score = await store.admin.zscore(keys.DUE_HOLDS, prefix)
                assert score is not None and score <= first[0][1], (prefix, score, first)
        expired += await store.sweeps.sweep_due(NOW_MS + horizon_ms)
        assert expired == placed == 1_500
        for beneficiary_id, relationship_id in families:
            assert await store.figures(beneficiary_id, relationship_id) == (1_000_000, 0)
            assert await store.admin.exists(keys.expiry(keys.prefix(beneficiary_id))) == 0

    run(redis_url, body)


# --- through the service ------------------------------------------------------------------


def test_the_running_sweeper_expires_a_hold_whose_index_entry_was_lost(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    assert held.decision == APPROVED
    prefix = keys.prefix(fam.beneficiary_id)
    harness.run(harness.client.zrem(keys.DUE_HOLDS, prefix))
    harness.clock.advance(86_401)  # past the 24 hours of a medical hold
    wait_for(lambda: figures(relationships, rid) == (50_000, 0, 0), seconds=10)
