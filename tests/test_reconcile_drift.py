"""Reconcile reports every disagreement between Redis and the ledger (issue 12, point 5), the
dangerous one above all: a quota Redis overstates. Two servers on one data directory left a quota
with held -7,400 fen and available 7,400 fen too high; reconcile compared only available + held,
found them equal, reported "0 drifted" and the drift alert never fired. Here Redis is made to
overstate on purpose, straight through a Redis client, as that server did."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY

from authz_server.domain.model import QuotaFigures
from authz_server.runtime.reconcile import Drift, drift_of, reconcile
from authz_server.server.app import record_reconcile
from authz_server.storage.redis import keys
from tests.harness import Harness
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import HOSPITAL, MEDICAL, authorize, family, register_merchants
from tests.test_reconcile_lost_holds import reconcile_family


def _negative_held(client: redis.Redis, quota: str) -> None:
    # The sum stays what the ledger says; available is 7,400 fen too high.
    client.hincrby(quota, "held", -7_400)
    client.hincrby(quota, "available", 7_400)


def _raised_available(client: redis.Redis, quota: str) -> None:
    client.hincrby(quota, "available", 7_400)


def family_with_a_hold(registry: Any, relationships: Any, authorizations: Any) -> tuple[str, str]:
    """A family of one 20,000 fen quota with an open hold of 5,000: (beneficiary, relationship)."""
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 5_000)
    return fam.beneficiary_id, relationship_id


def overstated(
    harness: Harness,
    beneficiary_id: str,
    relationship_id: str,
    overstate: Callable[[redis.Redis, str], None] = _raised_available,
) -> None:
    """Redis made to overstate the quota, straight through a Redis client."""
    client = harness.admin()
    try:
        overstate(client, keys.quota(beneficiary_id, relationship_id))
    finally:
        client.close()


@pytest.mark.parametrize("overstate", [_negative_held, _raised_available])
def test_reconcile_counts_a_quota_redis_overstates_in_its_report_and_metric(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    overstate: Callable[[redis.Redis, str], None],
) -> None:
    beneficiary_id, relationship_id = family_with_a_hold(registry, relationships, authorizations)
    # The pages of this family's quota (a pass over every quota of the session would count
    # what other tests leave overstated on purpose, and take seconds on PostgreSQL).
    clean = reconcile_family(harness, [relationship_id])
    assert (clean.drifted, clean.overstated) == (0, 0)
    overstated(harness, beneficiary_id, relationship_id, overstate)
    counted_before = REGISTRY.get_sample_value("medwallet_reconcile_drift_total") or 0.0
    fen_before = REGISTRY.get_sample_value("medwallet_reconcile_drift_fen_total") or 0.0

    report = reconcile_family(harness, [relationship_id])
    record_reconcile(report)  # what a server does with the report of its start's reconcile

    assert (report.drifted, report.drift_fen, report.overstated) == (1, 7_400, 1)
    assert REGISTRY.get_sample_value("medwallet_reconcile_drift_total") == counted_before + 1
    assert REGISTRY.get_sample_value("medwallet_reconcile_drift_fen_total") == fen_before + 7_400
    # Repaired from the ledger, the open hold kept.
    assert hot_figures(harness, beneficiary_id, relationship_id) == (15_000, 5_000)
    again = reconcile_family(harness, [relationship_id])
    assert (again.drifted, again.overstated) == (0, 0)


def test_understated_quotas_are_drift_too_but_not_overstated() -> None:
    ledger = QuotaFigures(available_fen=15_000, held_fen=5_000)
    assert drift_of(QuotaFigures(10_000, 5_000), ledger) == Drift(fen=5_000, overstated=False)
    assert drift_of(None, ledger) == Drift(fen=20_000, overstated=False)
    # Money moved between available and held by live calls while reconcile ran: no drift.
    assert drift_of(QuotaFigures(20_000, 0), ledger) is None
    assert drift_of(ledger, ledger) is None


def test_a_ledger_that_paid_out_more_than_was_allocated_is_overstated_drift() -> None:
    """SQL captured 207,400 fen against a quota of 200,000: the restore sets available to the
    negative unused figure; Redis said so before too, and the sums agree, yet money went out that
    was not there. (An older restore capped held at unused, leaving held negative: that too.)"""
    overdrawn = QuotaFigures(available_fen=-7_400, held_fen=0)
    assert drift_of(overdrawn, overdrawn) == Drift(fen=7_400, overstated=True)
    assert drift_of(None, overdrawn) == Drift(fen=7_400, overstated=True)
    capped = QuotaFigures(available_fen=0, held_fen=-7_400)
    assert drift_of(capped, overdrawn) == Drift(fen=7_400, overstated=True)


def test_holds_over_committing_a_quota_are_not_drift_once_redis_says_so() -> None:
    """Holds put back on money approved twice: 12,000 held of 10,000 unused. Redis saying just
    that is no drift (the put-back counted it once), and neither is a negative available
    whose sum a live call's hold moved since (only sums are compared); a different sum is."""
    over_committed = QuotaFigures(available_fen=-2_000, held_fen=12_000)
    assert drift_of(over_committed, over_committed) is None
    assert drift_of(QuotaFigures(-3_000, 13_000), over_committed) is None
    assert drift_of(QuotaFigures(-1_000, 12_000), over_committed) == Drift(1_000, True)


def test_a_restore_whose_reply_was_lost_is_tried_again_and_its_drift_still_counted(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis applied a quota's restore but its reply was lost (a timeout, as on a loaded machine
    during a server's start): reconcile tries it once more instead of failing the start, and the
    overstatement it repaired is still reported (measured from the figures read before)."""
    from authz_server.domain.errors import Unavailable

    beneficiary_id, relationship_id = family_with_a_hold(registry, relationships, authorizations)
    app = harness.app
    harness.run(reconcile(app.database, app.quotas, app.holds, harness.clock))  # others' repaired
    overstated(harness, beneficiary_id, relationship_id)
    real_restore = app.quotas.restore
    lost: list[str] = []

    async def reply_lost_once(quota: Any) -> Any:
        after = await real_restore(quota)
        if quota.relationship_id == relationship_id and not lost:
            lost.append(quota.relationship_id)  # applied in Redis; the caller hears nothing
            raise Unavailable("the quota store did not answer: TimeoutError")
        return after

    monkeypatch.setattr(app.quotas, "restore", reply_lost_once)
    report = harness.run(reconcile(app.database, app.quotas, app.holds, harness.clock))
    assert lost == [relationship_id]
    assert (report.drifted, report.drift_fen, report.overstated) == (1, 7_400, 1)
    assert hot_figures(harness, beneficiary_id, relationship_id) == (15_000, 5_000)


@pytest.mark.single_redis  # stops the one redis-server
def test_reconcile_rides_out_a_redis_stall_shorter_than_a_try_and_its_retry(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """The real redis-server stopped for 0.7 s as reconcile begins (its 0.5 s command timeout
    passes once): the quotas are tried again and set from the ledger; the start that runs this
    is not failed by one slow spell."""
    beneficiary_id, relationship_id = family_with_a_hold(registry, relationships, authorizations)
    app = harness.app
    overstated(harness, beneficiary_id, relationship_id)
    process = harness.redis.process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    resume = threading.Timer(0.7, os.kill, (process.pid, signal.SIGCONT))
    resume.start()
    try:
        report = harness.run(reconcile(app.database, app.quotas, None, harness.clock))
    finally:
        resume.join()
        os.kill(process.pid, signal.SIGCONT)
    assert report.overstated >= 1
    assert hot_figures(harness, beneficiary_id, relationship_id) == (15_000, 5_000)
