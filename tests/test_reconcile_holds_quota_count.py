"""A pass counts each quota once in `quotas` (medwallet_reconcile_quotas_total): a page counted
the other quotas of the holds SQL voided, which their own pages count as well (a fourth
audit)."""

from __future__ import annotations

from typing import Any

from authz_server.runtime.reconcile_holds import VOID_SETTLED_SECONDS
from tests.harness import Harness
from tests.test_authorization_recovery import journaled
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    family,
    funding,
    register_merchants,
    void,
)
from tests.test_reconcile_lost_holds import reconcile_family


def test_a_pass_counts_each_quota_once(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 3_000, 3_000)
    beneficiary = fam.beneficiary_id
    held = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 5_000)
    assert held.decision == APPROVED and len(funding(held.funding)) == 2
    journaled(harness, held.authorization_id)
    void(authorizations, HOSPITAL, held.authorization_id)
    harness.clock.advance(VOID_SETTLED_SECONDS + 1)
    report = reconcile_family(harness, fam.relationship_ids, rolling=True)
    # Pages of one quota each: the page that voids the hold counts its own quota only, the
    # other's page counts the other.
    assert report.quotas == len(fam.relationship_ids) == 2, report
