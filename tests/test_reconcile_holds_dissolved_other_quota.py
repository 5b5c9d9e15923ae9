"""A reconcile page never sets a quota outside it for a voided hold: a relationship dissolved
in SQL whose Redis step was lost (reconcile_dissolved mends it after SETTLED_AFTER_SECONDS)
was written DISSOLVED by quota_restore.lua, which zeroes its figures but does not void its
pending holds (quota_dissolve.lua does); reconcile_dissolved then skipped it, and a hold on it
and another quota kept that quota's money held until the hold expired (a fourth audit). A page
voids only holds all of whose quotas are its own."""

from __future__ import annotations

from typing import Any

from authz_server.runtime.reconcile import reconcile
from authz_server.runtime.reconcile_dissolved import (
    SETTLED_AFTER_SECONDS,
    reconcile_dissolved_page,
)
from tests.harness import Harness
from tests.test_authorization_recovery import hot_figures, journaled
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    dissolve,
    family,
    funding,
    register_merchants,
    void,
)
from tests.test_reconcile_lost_holds import serve_stale_copy, snapshot_slot


def _setup(harness: Harness, registry: Any, relationships: Any, authorizations: Any) -> Any:
    register_merchants(registry)
    fam = family(registry, relationships, 3_000, 3_000, 3_000)
    beneficiary, (one, two, three) = fam.beneficiary_id, fam.relationship_ids
    first = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 5_000)
    second = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 3_500)
    assert first.decision == APPROVED and second.decision == APPROVED
    assert set(dict(funding(first.funding))) == {one, two}
    assert set(dict(funding(second.funding))) == {two, three}
    journaled(harness, first.authorization_id, second.authorization_id)
    void(authorizations, HOSPITAL, first.authorization_id)  # voided in SQL and in Redis
    copy = snapshot_slot(harness, beneficiary)
    dissolve(relationships, two)  # SQL: dissolved; Redis: voids `second`, gives back 1,000
    assert hot_figures(harness, beneficiary, three) == (3_000, 0)
    serve_stale_copy(harness, beneficiary, copy)  # the dissolve's Redis step lost
    assert hot_figures(harness, beneficiary, three)[1] > 0
    harness.clock.advance(SETTLED_AFTER_SECONDS + 1)  # the void settled, the dissolution too
    return beneficiary, three


def test_reconcile_dissolved_alone_gives_the_money_back(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """Control: the dissolutions' cursor mends the lost step."""
    beneficiary, three = _setup(harness, registry, relationships, authorizations)
    app = harness.app
    harness.run(reconcile_dissolved_page(app.database, app.quotas, "", 50, harness.clock))
    assert hot_figures(harness, beneficiary, three) == (3_000, 0)


def test_a_page_does_not_hide_a_lost_dissolution_from_reconcile_dissolved(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    beneficiary, three = _setup(harness, registry, relationships, authorizations)
    app = harness.app
    harness.run(reconcile(app.database, app.quotas, app.holds, harness.clock))
    harness.run(reconcile_dissolved_page(app.database, app.quotas, "", 50, harness.clock))
    # The dissolved quota's hold still holds the third quota's money in Redis.
    assert hot_figures(harness, beneficiary, three) == (3_000, 0)
