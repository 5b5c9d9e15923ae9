"""Outside the rolling reconcile a hold Redis fails on fails the run after the page, not inside it:
the page was tried again (Database.run_locking) and the second try, finding Redis right,
reported nothing of what the first had set right (a fourth audit). Now what the page did is
logged and the run fails; the next run sets right what it could not."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from authz_server.domain.errors import Unavailable
from authz_server.runtime.reconcile import reconcile
from authz_server.runtime.reconcile_holds import VOID_SETTLED_SECONDS
from authz_server.storage.redis.hold_store import HoldStore
from tests.harness import Harness
from tests.test_authorization_recovery import hot_figures, journaled
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    family,
    register_merchants,
    void,
)
from tests.test_reconcile_lost_holds import serve_stale_copy, snapshot_slot


def test_a_retried_page_still_reports_the_hold_its_first_try_voided(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 10_000)
    beneficiary, (relationship_id,) = fam.beneficiary_id, fam.relationship_ids
    app = harness.app
    stale = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 3_000)
    assert stale.decision == APPROVED
    journaled(harness, stale.authorization_id)
    copy = snapshot_slot(harness, beneficiary)  # `stale` pending, `lost` not yet placed
    void(authorizations, HOSPITAL, stale.authorization_id)
    lost = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 4_000)
    assert lost.decision == APPROVED
    journaled(harness, lost.authorization_id)
    serve_stale_copy(harness, beneficiary, copy)
    harness.clock.advance(VOID_SETTLED_SECONDS + 1)

    real = HoldStore.restore_hold
    calls = [0]

    async def flaky(self: HoldStore, *arguments: Any) -> bool:
        calls[0] += 1
        if calls[0] <= 2:  # the first try and its one more try (tried_again)
            raise Unavailable("the quota store did not answer: TimeoutError")
        return await real(self, *arguments)

    monkeypatch.setattr(HoldStore, "restore_hold", flaky)
    with caplog.at_level(logging.ERROR), pytest.raises(Unavailable):
        harness.run(reconcile(app.database, app.quotas, app.holds, harness.clock))
    # The page is not tried again (its try did the void): the void is logged, the run fails.
    assert any(stale.authorization_id in record.getMessage() for record in caplog.records)
    assert hot_figures(harness, beneficiary, relationship_id) == (10_000, 0)  # voided, set
    report = harness.run(reconcile(app.database, app.quotas, app.holds, harness.clock))
    assert hot_figures(harness, beneficiary, relationship_id) == (6_000, 4_000)  # all set right
    assert (report.holds_put_back, report.holds_voided) == (1, 0), report
