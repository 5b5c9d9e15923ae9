"""One server reconciles every MEDWALLET_RECONCILE_INTERVAL_SECONDS while serving (runtime/
periodic_reconcile.py): a quota that went wrong without anybody noticing is set from the ledger
within an interval, and counted as drift (the alert's metric)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from authz_server.storage.redis import keys
from tests.harness import Harness, own_harness
from tests.test_live_reconcile import redis_agrees_with_sql
from tests.test_reconcile_drift import family_with_a_hold, overstated
from tests.test_redis_loss import served_stubs

INTERVAL_SECONDS = 0.3


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A server of its own, reconciling every INTERVAL_SECONDS."""
    yield from own_harness(
        tmp_path_factory.mktemp("periodic-reconcile"), reconcile_interval_seconds=INTERVAL_SECONDS
    )


def drift_counted() -> float:
    return REGISTRY.get_sample_value("medwallet_reconcile_drift_total") or 0.0


def test_a_quota_changed_behind_the_service_is_set_from_the_ledger_within_an_interval(
    own_server: Harness,
) -> None:
    harness = own_server
    stubs = served_stubs(harness)
    registry, relationships, authorizations, _ = next(stubs)
    try:
        beneficiary_id, relationship_id = family_with_a_hold(
            registry, relationships, authorizations
        )
        redis_agrees_with_sql(harness, beneficiary_id, relationship_id)
        counted_before = drift_counted()
        overstated(harness, beneficiary_id, relationship_id)  # by hand, nobody told
        with pytest.raises(AssertionError):
            redis_agrees_with_sql(harness, beneficiary_id, relationship_id)

        deadline = time.monotonic() + 30 * INTERVAL_SECONDS + 10
        while True:
            try:
                redis_agrees_with_sql(harness, beneficiary_id, relationship_id)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert drift_counted() > counted_before
    finally:
        stubs.close()

    # The turn is a key with an expiry shorter than the interval: the next look finds it free.
    client = harness.admin()
    try:
        for _ in range(100):
            turn_ms = client.pttl(keys.RECONCILE_TURN)
            if turn_ms > 0:
                break
            time.sleep(0.01)
        assert 0 < turn_ms <= INTERVAL_SECONDS * 1000
    finally:
        client.close()
