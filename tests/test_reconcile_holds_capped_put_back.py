"""A hold put back on money Redis approved a second time leaves available below zero, and later
releases of the quota's holds come out exact (a fifth audit: a page that set such a quota
again at once capped held at the ledger's unused, and a later void gave back more than the cap
kept). The next pass keeps it so (quota_restore.lua capped held at unused once: a later void
then gave back more than the cap kept)."""

from __future__ import annotations

from typing import Any

from tests.harness import Harness
from tests.test_authorization_recovery import hot_figures, journaled
from tests.test_authorization_rules import (
    APPROVED,
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize,
    family,
    register_merchants,
    void,
)
from tests.test_reconcile_lost_holds import reconcile_family, serve_stale_copy, snapshot_slot


def _approved_twice(harness: Harness, registry: Any, relationships: Any, authorizations: Any):
    register_merchants(registry)
    fam = family(registry, relationships, 10_000)
    beneficiary, (relationship_id,) = fam.beneficiary_id, fam.relationship_ids
    copy = snapshot_slot(harness, beneficiary)
    lost = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 4_000)
    assert lost.decision == APPROVED
    journaled(harness, lost.authorization_id)
    serve_stale_copy(harness, beneficiary, copy)  # `lost` gone from Redis, 10,000 available
    again = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 8_000)
    assert again.decision == APPROVED  # 2,000 of it approved twice
    journaled(harness, again.authorization_id)
    report = reconcile_family(harness, [relationship_id])
    assert report.holds_put_back == 1, report
    return beneficiary, relationship_id, lost, again


def test_voiding_the_other_hold_leaves_the_put_back_one_held(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    beneficiary, relationship_id, _lost, again = _approved_twice(
        harness, registry, relationships, authorizations
    )
    void(authorizations, HOSPITAL, again.authorization_id)
    # `lost` (4,000) is still pending: 6,000 may be authorized, no more.
    figures = hot_figures(harness, beneficiary, relationship_id)
    assert figures == (6_000, 4_000), figures
    assert authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 7_000).decision == DECLINED


def test_voiding_both_holds_gives_back_the_ledgers_unused_no_more(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    beneficiary, relationship_id, lost, again = _approved_twice(
        harness, registry, relationships, authorizations
    )
    void(authorizations, HOSPITAL, again.authorization_id)
    void(authorizations, HOSPITAL, lost.authorization_id)
    figures = hot_figures(harness, beneficiary, relationship_id)
    assert figures == (10_000, 0), figures  # the ledger: 10,000 unused, no open hold


def test_the_next_pass_does_not_cap_the_held_of_an_overcommitted_quota(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """The next pass keeps the holds' sum above unused (quota_restore.lua capped it once), and
    finds no drift in it: the put-back counted it."""
    beneficiary, relationship_id, lost, again = _approved_twice(
        harness, registry, relationships, authorizations
    )
    report = reconcile_family(harness, [relationship_id])
    assert hot_figures(harness, beneficiary, relationship_id) == (-2_000, 12_000)
    assert report.drifted == 0, report
    void(authorizations, HOSPITAL, again.authorization_id)
    void(authorizations, HOSPITAL, lost.authorization_id)
    figures = hot_figures(harness, beneficiary, relationship_id)
    assert figures == (10_000, 0), figures
