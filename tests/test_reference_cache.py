"""The merchant and catalog cache of a worker sees every change another worker commits, also one
stamped before a newer row it already read (a transaction that committed late): a merchant whose
designation is revoked elsewhere is refused here within a refresh. On the harness's database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from authz_server.service import reference_cache as reference_cache_module
from authz_server.service.reference_cache import ReferenceCache
from authz_server.storage.sql.tables import MerchantRow
from tests.harness import Harness, new_id


def write_merchant(harness: Harness, merchant_id: str, designated: bool, stamp: datetime) -> None:
    """What another worker's upsert commits: the row, stamped with its writer's clock."""

    def work(session: object) -> None:
        session.merge(  # type: ignore[attr-defined]
            MerchantRow(
                merchant_id=merchant_id,
                kind="RETAIL_PHARMACY",
                pooling_region="110100",
                designated=designated,
                name="pharmacy",
                updated_at=stamp,
            )
        )

    harness.app.database.transaction(work)


def test_a_late_commit_stamped_before_a_row_already_read_is_seen(harness: Harness) -> None:
    cache = ReferenceCache(harness.app.database)
    harness.run(cache.refresh())
    late, early = new_id("late-pharmacy"), new_id("early-pharmacy")
    stamped = datetime.now(UTC)  # the late writer stamps its row first ...
    write_merchant(harness, early, True, stamped + timedelta(milliseconds=5))  # ... another commits
    harness.run(cache.refresh())  # this worker reads the newer row
    assert cache.merchants[early].designated
    write_merchant(harness, late, False, stamped)  # ... and only now the late one commits
    harness.run(cache.refresh())
    assert late in cache.merchants
    assert cache.merchants[late].designated is False


def test_a_revoked_designation_reaches_every_worker(harness: Harness) -> None:
    merchant_id = new_id("pharmacy")
    write_merchant(harness, merchant_id, True, datetime.now(UTC))
    other_worker = ReferenceCache(harness.app.database)
    harness.run(other_worker.refresh())
    assert other_worker.merchants[merchant_id].designated
    write_merchant(harness, merchant_id, False, datetime.now(UTC))
    harness.run(other_worker.refresh())
    assert other_worker.merchants[merchant_id].designated is False


def test_rows_older_than_the_lookback_are_not_read_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unchanged catalog costs a refresh almost nothing: rows stamped before the previous
    refresh less the lookback are not read again (other tests' rows may be stamped by clocks
    they moved ahead, so only this test's rows are looked at)."""
    monkeypatch.setattr(reference_cache_module, "LOOKBACK_SECONDS", 60.0)
    old, recent = new_id("old-pharmacy"), new_id("recent-pharmacy")
    write_merchant(harness, old, True, datetime.now(UTC) - timedelta(hours=1))
    write_merchant(harness, recent, True, datetime.now(UTC) - timedelta(seconds=30))
    cache = ReferenceCache(harness.app.database)
    harness.run(cache.refresh())  # everything, once
    assert {old, recent} <= set(cache.merchants)
    harness.run(cache.refresh())
    assert cache.refreshed_at is not None
    since = cache.refreshed_at - timedelta(seconds=reference_cache_module.LOOKBACK_SECONDS)
    merchants, _ = harness.app.database.transaction(
        lambda session: cache._changed(session, since=since)
    )
    read_again = {row.merchant_id for row in merchants}
    assert recent in read_again  # within the lookback: read again, harmlessly
    assert old not in read_again
