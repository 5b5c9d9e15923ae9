"""A split hold SQL voided, which an older copy still holds, is voided before its quotas are set
(runtime/reconcile_holds.py): left pending, the restore (then) capped its quota's held at the
ledger's unused, and its expiry then gave its whole part back to available, more than the quota
has (a fifth audit)."""

from __future__ import annotations

from typing import Any

from authz_server.runtime.reconcile_holds import VOID_SETTLED_SECONDS
from tests.harness import Harness
from tests.test_authorization_recovery import hot_figures, journaled
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    funding,
    register_merchants,
    void,
)
from tests.test_reconcile_lost_holds import reconcile_family, serve_stale_copy, snapshot_slot


def test_a_stale_split_hold_left_pending_does_not_overstate_a_quota_spent_since(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 3_000, 2_000)
    beneficiary, (one, two) = fam.beneficiary_id, fam.relationship_ids
    stale = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 5_000)
    assert stale.decision == APPROVED
    assert dict(funding(stale.funding)) == {one: 3_000, two: 2_000}
    journaled(harness, stale.authorization_id)
    copy = snapshot_slot(harness, beneficiary)  # `stale` pending on both quotas
    void(authorizations, HOSPITAL, stale.authorization_id)
    paid = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 2_500)
    assert paid.decision == APPROVED and dict(funding(paid.funding)) == {one: 2_500}
    journaled(harness, paid.authorization_id)
    assert capture(authorizations, HOSPITAL, paid.authorization_id).status == CAPTURED
    serve_stale_copy(harness, beneficiary, copy)  # the ledger: 500 and 2,000 unused, no hold
    harness.clock.advance(VOID_SETTLED_SECONDS + 1)

    # Pages of one quota each: the hold's quotas in different pages.
    reconcile_family(harness, fam.relationship_ids, rolling=True)
    harness.clock.advance(25 * 3600)  # `stale` expires in Redis (it was still PENDING there)
    authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 1)  # runs expire_due
    available, held = hot_figures(harness, beneficiary, one)
    # At most the ledger's 500 unused (less the 1 fen just held) may be authorized.
    assert held >= 0 and available + held <= 500, (available, held)
