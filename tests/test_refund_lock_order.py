"""Refunds take their quota locks in the order every other writer takes them (ascending
relationship id, after the settlement lock). A refund goes back last-drawn part first, and the
refunds of a group commit come in any order: each locking its quotas as it went, a batch holding
the higher id and asking for the lower deadlocked on PostgreSQL with a capture batch, which
locks its quotas in id order in one statement, and after deadlock_timeout (1 s) one side failed
(UNAVAILABLE to its till). Now the group commit locks its refunds' quotas in id order before
they run (storage/sql/refund_locks.py), and the capture waits for the refunds
instead. PostgreSQL only (TEST_DATABASE_URL); SQLite has one writer at a time."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from authz_server.generated.medwallet.v1 import authorization_pb2, relationship_pb2
from authz_server.storage.sql import records
from authz_server.storage.sql.tables import LedgerEntryRow, RelationshipRow
from tests.harness import APP, Harness, new_id
from tests.pg_locks import waited_for_rows
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    figures,
    refund,
    register_merchants,
)

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"), reason="a lock-order deadlock needs PostgreSQL"
)


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


def _calling(call: Callable[[], Any]) -> str:
    """The call's outcome as the till sees it: OK, or the gRPC code and details."""
    try:
        call()
        return "OK"
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"


def _two_quotas(registry: Any, relationships: Any) -> tuple[str, str, str]:
    """(beneficiary, low, high): two quotas of 10,000, the newer one with the higher id."""
    while True:
        people = family(registry, relationships, 10_000, 10_000)
        low, high = people.relationship_ids
        if high > low:
            return people.beneficiary_id, low, high


def _funding(answer: authorization_pb2.AuthorizeResponse) -> list[tuple[str, int]]:
    assert answer.decision == APPROVED
    return [(part.relationship_id, part.amount_fen) for part in answer.funding]


def _refunds_beside_a_capture(
    harness: Harness,
    monkeypatch: Any,
    low: str,
    refunding: Callable[[], Any],
    capturing: Callable[[], Any],
) -> tuple[str, str]:
    """Runs `refunding` until its refund (one of them) asks for the lower quota's row, having
    locked the higher one as it went (before the fix); then `capturing`, whose batch locks both
    in id order and must wait for a row (the higher, before; the lower now, which the refunds'
    batch locked first); then lets the refund go on. Answers both outcomes."""
    asking, go = threading.Event(), threading.Event()
    real = records.relationship_row
    armed = [True]

    def pausing(session: Any, relationship_id: str, *, lock: bool = False) -> Any:
        if lock and relationship_id == low and armed[0]:
            armed[0] = False
            asking.set()
            go.wait(15)
        return real(session, relationship_id, lock=lock)

    monkeypatch.setattr(records, "relationship_row", pausing)
    with ThreadPoolExecutor(2) as pool:
        refunded = pool.submit(_calling, refunding)
        assert asking.wait(15), "the refund never asked for the lower quota's row"
        captured = pool.submit(_calling, capturing)
        waited = waited_for_rows(harness.database_url, "relationships")
        go.set()
        assert waited, "the capture never waited for a quota's row: no deadlock to test"
        return refunded.result(30), captured.result(30)


def _in_sql(
    harness: Harness, relationship_ids: list[str], authorization_ids: list[str]
) -> tuple[list[tuple[int, int]], list[tuple[str, str, int]]]:
    """The quotas' (captured, refunded to quota) totals, and the authorizations' refund entries
    in the ledger (kind, relationship, fen) as written."""

    def read(session: Any) -> tuple[list[tuple[int, int]], list[tuple[str, str, int]]]:
        rows = {
            row.relationship_id: (row.captured_total_fen, row.refunded_to_quota_total_fen)
            for row in session.scalars(
                select(RelationshipRow).where(RelationshipRow.relationship_id.in_(relationship_ids))
            )
        }
        entries = session.execute(
            select(LedgerEntryRow.kind, LedgerEntryRow.relationship_id, LedgerEntryRow.amount_fen)
            .where(
                LedgerEntryRow.authorization_id.in_(authorization_ids),
                LedgerEntryRow.kind != "CAPTURE",
            )
            .order_by(LedgerEntryRow.entry_id)
        ).all()
        return [rows[each] for each in relationship_ids], [tuple(entry) for entry in entries]

    return harness.app.database.transaction(read)


def test_a_refund_and_a_capture_of_the_same_quotas_do_not_deadlock(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, monkeypatch: Any
) -> None:
    beneficiary, low, high = _two_quotas(registry, relationships)
    refunded = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 12_000)
    assert _funding(refunded) == [(low, 10_000), (high, 2_000)]
    capture(authorizations, HOSPITAL, refunded.authorization_id)
    # 5,000 more on the lower quota: a second payment, more than either has, draws from both.
    relationships.AllocateQuota(
        relationship_pb2.AllocateQuotaRequest(
            relationship_id=low, amount_fen=5_000, idempotency_key=new_id("alloc")
        ),
        metadata=APP,
    )
    captured = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 12_000)
    assert _funding(captured) == [(low, 5_000), (high, 7_000)]

    # The refund goes back to the higher quota first (its last-drawn part), then the lower.
    outcomes = _refunds_beside_a_capture(
        harness,
        monkeypatch,
        low,
        lambda: refund(authorizations, HOSPITAL, refunded.authorization_id, 5_000),
        lambda: capture(authorizations, HOSPITAL, captured.authorization_id),
    )
    assert outcomes == ("OK", "OK")
    assert _in_sql(harness, [low, high], [refunded.authorization_id]) == (
        [(15_000, 3_000), (9_000, 2_000)],
        [("REFUND_TO_QUOTA", high, 2_000), ("REFUND_TO_QUOTA", low, 3_000)],
    )
    # (available, held, spent): low 15,000 allocated, 12,000 spent; high 10,000, 7,000 spent.
    assert figures(relationships, low) == (3_000, 0, 12_000)
    assert figures(relationships, high) == (3_000, 0, 7_000)


def test_two_refunds_of_one_batch_and_a_capture_do_not_deadlock(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, monkeypatch: Any
) -> None:
    """Each refund draws back from one quota only: their batch, in the order they came (the
    higher quota's first), is what locked both in the wrong order."""
    beneficiary, low, high = _two_quotas(registry, relationships)
    on_high, on_low = (
        authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 2_000, relationship_id=quota)
        for quota in (high, low)
    )
    assert (_funding(on_high), _funding(on_low)) == ([(high, 2_000)], [(low, 2_000)])
    for each in (on_high, on_low):
        capture(authorizations, HOSPITAL, each.authorization_id)
    captured = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 12_000)
    assert _funding(captured) == [(low, 8_000), (high, 4_000)]

    batch = harness.app.authorizations.group_commit
    real_submit = batch.submit
    arrived: list[tuple[Any, dict[str, Any]]] = []
    first_arrived, both_arrived = threading.Event(), asyncio.Event()
    submitted: list[asyncio.Future[Any]] = []

    async def together(work: Any, **options: Any) -> Any:
        """The two refunds' units submitted in one tick, in the order they came: queued
        before the group commit wakes, so in one batch."""
        place = len(arrived)
        arrived.append((work, options))
        first_arrived.set()
        if len(arrived) == 2:
            submitted.extend(asyncio.ensure_future(real_submit(w, **o)) for w, o in arrived)
            both_arrived.set()
        await both_arrived.wait()
        return await submitted[place]

    def both_refunds() -> None:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(refund, authorizations, HOSPITAL, on_high.authorization_id, 2_000)
            assert first_arrived.wait(15), "the first refund never reached its group commit"
            second = pool.submit(refund, authorizations, HOSPITAL, on_low.authorization_id, 2_000)
            first.result(30)
            second.result(30)

    monkeypatch.setattr(batch, "submit", together)
    outcomes = _refunds_beside_a_capture(
        harness,
        monkeypatch,
        low,
        both_refunds,
        lambda: capture(authorizations, HOSPITAL, captured.authorization_id),
    )
    assert outcomes == ("OK", "OK")
    assert _in_sql(harness, [low, high], [on_high.authorization_id, on_low.authorization_id]) == (
        [(10_000, 2_000), (6_000, 2_000)],
        [("REFUND_TO_QUOTA", high, 2_000), ("REFUND_TO_QUOTA", low, 2_000)],
    )
    # (available, held, spent): low 8,000 spent (the capture), high 4,000.
    assert figures(relationships, low) == (2_000, 0, 8_000)
    assert figures(relationships, high) == (6_000, 0, 4_000)
