"""A hold SQL voided whose quotas fall in different pages of the reconcile (relationship ids are
random: a beneficiary's quotas nearly always do) is voided too: the page locks its other quotas
without waiting and sets those active in SQL again after the void. A fifth audit found a page
that voided only holds all on its own quotas: such a hold kept its money held in Redis until it
expired (up to 24 h)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from authz_server.domain.errors import Unavailable
from authz_server.runtime.reconcile_holds import VOID_SETTLED_SECONDS
from tests.harness import Harness
from tests.test_authorization_recovery import hot_figures, journaled
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


def test_a_split_hold_whose_void_was_lost_is_voided_when_its_quotas_are_in_different_pages(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 3_000, 3_000)
    beneficiary, (one, two) = fam.beneficiary_id, fam.relationship_ids
    app = harness.app
    held = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 5_000)
    assert held.decision == APPROVED and len(funding(held.funding)) == 2
    journaled(harness, held.authorization_id)
    real_void = app.holds.void

    async def lost(*arguments: Any) -> Any:
        raise Unavailable("the quota store did not answer: TimeoutError")

    app.holds.void = lost  # type: ignore[method-assign]
    try:
        with pytest.raises(grpc.RpcError):
            void(authorizations, HOSPITAL, held.authorization_id)
    finally:
        app.holds.void = real_void  # type: ignore[method-assign]
    harness.clock.advance(VOID_SETTLED_SECONDS + 1)

    # Pages of one quota each: the two quotas in different pages.
    voided = reconcile_family(harness, fam.relationship_ids, rolling=True).holds_voided
    figures = [hot_figures(harness, beneficiary, one), hot_figures(harness, beneficiary, two)]
    assert figures == [(3_000, 0), (3_000, 0)] and voided == 1, (figures, voided)
