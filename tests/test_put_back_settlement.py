"""After a Redis loss the rebuild lists every open hold it puts back, and every slot with one
falls due for the sweeper's settlement at once, STALE_CAPTURE_SECONDS later. The sweeper took
SLOTS_PER_BATCH (100) slots a round, each slot visited twice: ~47 holds a second (20,000 holds
in ~7 min, a province's hundreds of thousands in hours, their expiries waiting until settled).
Now a round goes on to the next slots due (HoldSweeper.settle_due, SETTLE_CALLS_PER_ROUND calls)
and settles the put-back holds of a batch with one SQL read (capture_recovery.settle_put_back).
Real Redis and SQL; the settlement is called as the sweeper calls it, at a time the running
sweeper (on the test clock) has not reached."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from authz_server.service import capture_recovery
from authz_server.service.ports import STALE_CAPTURE_SECONDS, HoldStatus
from authz_server.storage.redis.sweep_store import SLOTS_PER_BATCH
from authz_server.storage.redis.sweeper import SETTLE_CALLS_PER_ROUND, HoldSweeper
from tests.harness import Harness, lose_redis
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    family,
    register_merchants,
)
from tests.test_capture_unfinished_across_rebuild import awaiting_settlement, now_ms_of, status
from tests.test_live_reconcile import redis_agrees_with_sql

# Beneficiaries (a slot each, nearly always): more than two calls' worth of slots.
FAMILIES = 2 * SLOTS_PER_BATCH + 30
QUOTA_FEN = 5_000
HELD_FEN = 1_200


def settled_as(*outcomes: str) -> float:
    """medwallet_captures_settled_total, summed over these outcomes."""
    return sum(
        REGISTRY.get_sample_value("medwallet_captures_settled_total", {"outcome": outcome}) or 0.0
        for outcome in outcomes
    )


def test_one_round_settles_every_put_back_hold_due_not_one_batch_of_slots(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, monkeypatch: Any
) -> None:
    assert SETTLE_CALLS_PER_ROUND * SLOTS_PER_BATCH > 2 * FAMILIES  # room for each slot twice
    register_merchants(registry)
    families = [family(registry, relationships, QUOTA_FEN) for _ in range(FAMILIES)]
    held = {}
    for fam in families:
        answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, HELD_FEN)
        assert answer.decision == APPROVED
        held[answer.authorization_id] = fam
    lose_redis(harness)  # every hold put back (PENDING, rs = 1) and listed
    assert all(awaiting_settlement(harness, authorization_id) for authorization_id in held)

    # Small batches: the holds of a call settled over several SQL reads.
    monkeypatch.setattr(capture_recovery, "SETTLE_BATCH_HOLDS", 64)
    app = harness.app
    reads = 0
    real_run = app.database.run

    async def counted(work: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real_run(work)

    monkeypatch.setattr(app.database, "run", counted)
    sweeper = HoldSweeper(app.storage.sweeps, 1.0)
    due_ms = now_ms_of(harness) + (STALE_CAPTURE_SECONDS + 5) * 1000
    settled: list[str] = []

    async def settle(stalled: list[str], now_ms: int) -> None:
        settled.extend(stalled)
        await capture_recovery.settle_stalled(app.database, app.holds, stalled, now_ms)

    async def one_round() -> None:
        await sweeper.settle_due(due_ms, await sweeper.stalled_captures(due_ms), settle)

    opened_before = settled_as("not_captured")
    counted_before = settled_as("captured", "not_captured", "live")
    harness.run(one_round())

    assert set(held) <= set(settled)  # one round: before, the first 100 slots' holds only
    # medwallet_captures_settled_total: each id settled counted once, ours as SQL said
    assert settled_as("captured", "not_captured", "live") - counted_before == len(settled)
    assert settled_as("not_captured") - opened_before >= FAMILIES
    assert reads <= len(settled) // 64 + 2 * SETTLE_CALLS_PER_ROUND, reads  # not one a hold
    for authorization_id, fam in held.items():
        assert not awaiting_settlement(harness, authorization_id)
        # SQL has no capture: an ordinary open hold again, its money still held
        assert status(harness, authorization_id) is HoldStatus.PENDING
        (relationship_id,) = fam.relationship_ids
        assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (
            QUOTA_FEN - HELD_FEN,
            HELD_FEN,
        )
    for fam in families[:: FAMILIES // 10]:
        redis_agrees_with_sql(harness, fam.beneficiary_id, fam.relationship_ids[0])
