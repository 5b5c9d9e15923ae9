"""MEDWALLET_ABANDONED_HOLD_SECONDS=0: an operator's switch that turns the release of abandoned
holds off and leaves the rolling reconcile on. A hold nobody was told of then holds its money
until it expires, as before the release was built, however many passes run over it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import Harness
from tests.held_proxy import HeldProxy
from tests.test_abandoned_holds import (
    G,
    behind_a_proxy,
    delivered_late,
    key_row,
    pages_run,
    released_count,
)
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import MEDICAL, authorize_request, family, wait_for
from tests.test_redis_loss import served_stubs


@pytest.fixture(scope="module")
def switched_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, HeldProxy]]:
    yield from behind_a_proxy(
        tmp_path_factory.mktemp("abandoned-holds-off"),
        reconcile_quotas_per_second=5_000,
        abandoned_hold_seconds=0,
    )


def test_with_the_grace_at_0_no_hold_is_released_and_the_reconcile_runs_on(
    switched_off: tuple[Harness, HeldProxy],
) -> None:
    harness, proxy = switched_off
    stubs = served_stubs(harness)
    registry, relationships, authorizations, _ = next(stubs)
    try:
        fam = family(registry, relationships, 20_000)
        (relationship_id,) = fam.relationship_ids
        request = authorize_request(fam.beneficiary_id, MEDICAL, 12_000)
        delivered_late(harness, proxy, authorizations, [request])
        released_before = released_count()
        harness.clock.advance(G * 10)  # long past any grace, well before the hold's expiry
        pages = pages_run()
        wait_for(lambda: pages_run() > pages + 20, seconds=10)  # the reconcile runs on
        assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
        assert key_row(harness, request.idempotency_key) is None
        assert released_count() == released_before
    finally:
        stubs.close()
