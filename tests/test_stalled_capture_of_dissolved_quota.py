"""A capture claimed (CAPTURING) on a hold split over two quotas, its process dead before SQL
had anything; meanwhile the first quota's relationship is dissolved. The dissolution leaves a
CAPTURING hold to its capture (lua/_lib.lua holds_of_dissolved: voids only PENDING ones), and
the sweeper then settles the stalled claim as SQL says: no capture, so the hold went back to
PENDING (capture_finish.lua), on a quota that is DISSOLVED. Its part on the second quota stayed
held for nobody until the hold expired (a day for a medical hold): a payment the second quota
could pay was declined INSUFFICIENT_QUOTA, and no reconcile frees it (the hold counts as open
in Redis; SQL never marked it voided; the dissolutions' cursor finds the quota dissolved in
Redis already). A capture of it is refused in SQL anyway (RELATIONSHIP_NOT_ACTIVE): the hold is
voided there as the dissolution would have, its part on the second quota back at once (as a
put-back hold's settlement does, lua/capture_clear.lua). Found by an audit; fails before."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from authz_server.service.ports import HoldStatus
from authz_server.storage.redis.hold_store import STALE_CAPTURE_SECONDS
from tests.harness import Harness, new_id
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    register_merchants,
    wait_for,
)
from tests.test_live_reconcile import redis_agrees_with_sql
from tests.test_relationship_rules import dissolve

# The running sweeper (a round a second) settles a stalled claim within a few rounds.
SWEEP_WAIT_SECONDS = 20.0


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


def status(harness: Harness, authorization_id: str) -> HoldStatus | None:
    hold = harness.run(harness.app.holds.get(authorization_id))
    return None if hold is None else hold.status


def test_a_stalled_capture_settled_after_a_dissolution_frees_the_other_quotas_part(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    fam = family(registry, relationships, 10_000, 10_000)
    first, second = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    assert [(part.relationship_id, part.amount_fen) for part in held.funding] == [
        (first, 10_000),
        (second, 5_000),
    ]
    # A capture claimed over STALE_CAPTURE_SECONDS ago by a process that then died (nothing
    # in SQL): the sweeper settles it at its next round.
    stale_ms = int(harness.clock().timestamp() * 1000) - (STALE_CAPTURE_SECONDS + 1) * 1000
    claimed = harness.run(
        harness.app.holds.capture_begin(
            held.authorization_id, "rules-hospital", new_id("capture"), 0, stale_ms
        )
    )
    assert claimed.outcome == "OK"
    dissolve(relationships, first)  # the CAPTURING hold is left to its capture
    wait_for(
        lambda: status(harness, held.authorization_id) is not HoldStatus.CAPTURING,
        seconds=SWEEP_WAIT_SECONDS,
    )

    # Nothing can capture it any more (SQL refuses a hold on a dissolved quota): the second
    # quota's part is back at once, not held until the hold expires a day later.
    assert status(harness, held.authorization_id) is HoldStatus.VOIDED
    assert hot_figures(harness, fam.beneficiary_id, second) == (10_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, second)
    paid = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
    assert paid.decision == APPROVED, paid
    with pytest.raises(grpc.RpcError) as refusal:
        capture(authorizations, HOSPITAL, held.authorization_id)
    assert refusal.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "RELATIONSHIP_NOT_ACTIVE" in (refusal.value.details() or "")
