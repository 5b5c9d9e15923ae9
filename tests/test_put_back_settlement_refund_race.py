"""The batched settlement of put-back holds (capture_recovery.settle_stalled) beside other
writers of the same quotas on PostgreSQL. One settlement transaction locks the union of a
batch's quotas in id order; a failed one failed that sweeper round's later batches too (the
reconcile at start-up: the start).

- Beside a refund (an audit's test): a refund locked its capture's quotas last-drawn part first,
  and one holding the higher id and waiting for the lower deadlocked with the settlement. Now
  refunds lock their quotas in id order too (storage/sql/refund_locks.py): the settlement waits.
- Beside a transaction that still locks in another order (a worker of the version before, in a
  rolling upgrade; an operator's script): PostgreSQL aborts the settlement's side of the
  deadlock, and the batch is tried again (Database.run_locking) and succeeds.

PostgreSQL only (TEST_DATABASE_URL); SQLite has one writer at a time."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, text

from authz_server.service import capture_recovery
from authz_server.service.ports import HoldStatus
from authz_server.storage.sql import records
from tests.harness import Harness, lose_redis
from tests.pg_locks import waited_for_rows
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    refund,
    register_merchants,
)
from tests.test_capture_unfinished_across_rebuild import now_ms_of

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"), reason="a lock-order deadlock needs PostgreSQL"
)


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


def _two_put_back_holds(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> tuple[str, str, list[str], str]:
    """(low, high, the ids of two holds a rebuild put back, one on each quota, and a captured
    authorization split over both): two quotas, the newer one with the higher id."""
    while True:
        people = family(registry, relationships, 10_000, 10_000)
        low, high = people.relationship_ids
        if high > low:
            break
    beneficiary = people.beneficiary_id
    on_low = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 2_000)  # low only
    split = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 12_000)  # low 8k, high 4k
    assert [part.relationship_id for part in split.funding] == [low, high]
    capture(authorizations, HOSPITAL, split.authorization_id)
    on_high = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 3_000)  # high only
    for answer in (on_low, split, on_high):
        assert answer.decision == APPROVED
    assert [p.relationship_id for p in on_low.funding] == [low]
    assert [p.relationship_id for p in on_high.funding] == [high]

    lose_redis(harness)  # both holds put back (PENDING, rs = 1) and listed
    ids = [on_low.authorization_id, on_high.authorization_id]
    for authorization_id in ids:
        hold = harness.run(harness.app.holds.get(authorization_id))
        assert hold is not None and hold.status is HoldStatus.PENDING and hold.put_back
    return low, high, ids, split.authorization_id


def _settling(harness: Harness, ids: list[str]) -> Any:
    """The sweeper's settle call for `ids`, started on the service's loop."""
    return asyncio.run_coroutine_threadsafe(
        capture_recovery.settle_stalled(
            harness.app.database, harness.app.holds, ids, now_ms_of(harness)
        ),
        harness.loop,
    )


def test_settling_put_back_holds_does_not_deadlock_with_a_refund(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, monkeypatch: Any
) -> None:
    _, high, ids, split_id = _two_put_back_holds(harness, registry, relationships, authorizations)

    # The refund pauses while it holds its quotas (in id order, then the higher one again as its
    # last-drawn part): the settlement waits for the lower one.
    holding, go = threading.Event(), threading.Event()
    real = records.relationship_row
    armed = [True]

    def pausing(session: Any, relationship_id: str, *, lock: bool = False) -> Any:
        row = real(session, relationship_id, lock=lock)
        if lock and relationship_id == high and armed[0]:
            armed[0] = False
            holding.set()
            go.wait(15)
        return row

    monkeypatch.setattr(records, "relationship_row", pausing)

    def refunding() -> str:
        try:
            refund(authorizations, HOSPITAL, split_id, 5_000)  # high 4k, low 1k
            return "OK"
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"

    with ThreadPoolExecutor(1) as pool:
        refunded = pool.submit(refunding)
        assert holding.wait(15), "the refund never locked the higher quota"
        settling = _settling(harness, ids)
        waited = waited_for_rows(harness.database_url, "relationships")
        go.set()  # the refund goes on to the lower quota's row
        assert waited, "the settlement never waited for the refund's row: no race to test"
        refund_result = refunded.result(30)
    try:
        settle_result: object = settling.result(30)
    except Exception as error:
        settle_result = f"{type(error).__name__}: {error}"
    assert (refund_result, settle_result) == ("OK", 2)


def test_a_settlement_that_meets_a_deadlock_is_tried_again(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    low, high, ids, _ = _two_put_back_holds(harness, registry, relationships, authorizations)
    deadlocks_before = _deadlocks()
    engine = create_engine(harness.database_url)
    try:
        with engine.connect() as other:
            # Outside the service's lock order: the higher quota first. Its deadlock check
            # waits longer than the service's (PostgreSQL's default, 1 s), so PostgreSQL ends
            # the settlement's side of the deadlock, not this one.
            other.execute(text("SET deadlock_timeout = '20s'"))
            lock = "SELECT 1 FROM relationships WHERE relationship_id = :id FOR UPDATE"
            other.execute(text(lock), {"id": high})
            settling = _settling(harness, ids)  # takes the lower quota, waits for the higher
            waited = waited_for_rows(harness.database_url, "relationships")
            assert waited, "the settlement never waited for the higher quota: no deadlock"
            other.execute(text(lock), {"id": low})  # a deadlock: the settlement's side ends
            other.commit()
        settled = settling.result(30)
    finally:
        engine.dispose()
    assert settled == 2  # tried again after the deadlock (Database.run_locking), then settled
    assert _deadlocks() == deadlocks_before + 1  # counted for the SRE (the settlement's side)


def _deadlocks() -> float:
    value = REGISTRY.get_sample_value("medwallet_sql_unavailable_total", {"kind": "deadlock"})
    return value or 0.0
