"""A pass counts each quota once in `quotas` (medwallet_reconcile_quotas_total): a page counted
the other quotas of the holds SQL voided, which their own pages count as well (a fourth
audit)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from authz_server.domain.types import RelationshipStatus
from authz_server.runtime.reconcile import reconcile_page
from authz_server.runtime.reconcile_holds import VOID_SETTLED_SECONDS
from authz_server.storage.sql.tables import RelationshipRow
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
    app = harness.app
    active = app.database.transaction(
        lambda session: session.scalar(
            select(func.count())
            .select_from(RelationshipRow)
            .where(RelationshipRow.status == RelationshipStatus.ACTIVE.value)
        )
    )
    after, counted = "", 0
    while True:  # pages of one quota, as a province's beneficiaries spread over pages
        after, report = harness.run(
            reconcile_page(
                app.database,
                app.quotas,
                after,
                1,
                rolling=True,
                holds=app.holds,
                clock=harness.clock,
            )
        )
        counted += report.quotas
        if not after:
            break
    assert counted == active  # each active quota once in the pass (the session's others too)
