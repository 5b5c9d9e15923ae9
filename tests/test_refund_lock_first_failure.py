"""A failure inside the refund batch's lock_first step (a lost connection, a lock timeout, a
deadlock: OperationalError) fails the whole batch before any savepoint. Every refund of the batch
is answered UNAVAILABLE with nothing of it in SQL or Redis, and each till's retry with the same
idempotency key then refunds exactly once."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from authz_server.storage.sql.tables import CaptureRow, LedgerEntryRow, RefundRow
from tests.harness import Harness, new_id
from tests.test_authorization_rules import (
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    figures,
    refund,
    register_merchants,
)


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


def test_a_failed_lock_first_fails_its_batch_and_the_retries_refund_once(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, monkeypatch: Any
) -> None:
    people = family(registry, relationships, 10_000)
    (quota,) = people.relationship_ids
    ids = []
    for _ in range(2):
        answer = authorize(authorizations, HOSPITAL, people.beneficiary_id, MEDICAL, 3_000)
        capture(authorizations, HOSPITAL, answer.authorization_id)
        ids.append(answer.authorization_id)
    assert figures(relationships, quota) == (4_000, 0, 6_000)

    batch = harness.app.authorizations.group_commit
    real_lock_first = batch.lock_first
    failed_batches: list[list[str]] = []

    def failing(session: Any, keys: list[str]) -> None:
        if real_lock_first is not None:
            real_lock_first(session, keys)
        if not failed_batches:
            failed_batches.append(list(keys))
            raise OperationalError("SELECT ... FOR UPDATE", {}, Exception("connection lost"))

    monkeypatch.setattr(batch, "lock_first", failing)

    real_submit = batch.submit
    arrived: list[tuple[Any, dict[str, Any]]] = []
    first_arrived, both_arrived = threading.Event(), asyncio.Event()
    submitted: list[asyncio.Future[Any]] = []

    async def together(work: Any, **options: Any) -> Any:
        place = len(arrived)
        arrived.append((work, options))
        first_arrived.set()
        if len(arrived) == 2:
            submitted.extend(asyncio.ensure_future(real_submit(w, **o)) for w, o in arrived)
            both_arrived.set()
        await both_arrived.wait()
        return await submitted[place]

    monkeypatch.setattr(batch, "submit", together)
    keys = [new_id("refund"), new_id("refund")]

    def outcome(authorization_id: str, key: str) -> str:
        try:
            refund(authorizations, HOSPITAL, authorization_id, 1_000, key=key)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(outcome, ids[0], keys[0])
        assert first_arrived.wait(15)
        second = pool.submit(outcome, ids[1], keys[1])
        outcomes = [first.result(30), second.result(30)]
    assert sorted(failed_batches[0]) == sorted(ids)
    assert outcomes == ["UNAVAILABLE", "UNAVAILABLE"]

    def in_sql(session: Any) -> tuple[int, int, int]:
        return (
            session.scalar(select(func.count()).where(RefundRow.authorization_id.in_(ids))),
            session.scalar(
                select(func.coalesce(func.sum(CaptureRow.refunded_fen), 0)).where(
                    CaptureRow.authorization_id.in_(ids)
                )
            ),
            session.scalar(
                select(func.count()).where(
                    LedgerEntryRow.authorization_id.in_(ids),
                    LedgerEntryRow.kind != "CAPTURE",
                )
            ),
        )

    assert harness.app.database.transaction(in_sql) == (0, 0, 0)
    assert figures(relationships, quota) == (4_000, 0, 6_000)

    monkeypatch.setattr(batch, "submit", real_submit)
    for authorization_id, key in zip(ids, keys, strict=True):  # the tills' retries, twice
        assert outcome(authorization_id, key) == "OK"
        assert outcome(authorization_id, key) == "OK"
    assert harness.app.database.transaction(in_sql) == (2, 2_000, 2)
    assert figures(relationships, quota) == (6_000, 0, 4_000)


def test_a_refund_cancelled_by_its_deadline_while_lock_first_runs_is_credited_as_sql_says(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, monkeypatch: Any
) -> None:
    import time

    from authz_server.generated.medwallet.v1 import authorization_pb2 as pb

    people = family(registry, relationships, 10_000)
    (quota,) = people.relationship_ids
    answer = authorize(authorizations, HOSPITAL, people.beneficiary_id, MEDICAL, 3_000)
    capture(authorizations, HOSPITAL, answer.authorization_id)
    authorization_id = answer.authorization_id
    batch = harness.app.authorizations.group_commit
    real_lock_first = batch.lock_first

    def slow(session: Any, keys: list[str]) -> None:
        if real_lock_first is not None:
            real_lock_first(session, keys)
        time.sleep(1.0)  # past the caller's deadline, inside the batch's transaction

    monkeypatch.setattr(batch, "lock_first", slow)
    key = new_id("refund")
    with pytest.raises(grpc.RpcError) as raised:
        authorizations.Refund(
            pb.RefundRequest(
                authorization_id=authorization_id, amount_fen=1_000, idempotency_key=key
            ),
            metadata=HOSPITAL,
            timeout=0.3,
        )
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    monkeypatch.setattr(batch, "lock_first", real_lock_first)

    def refunded(session: Any) -> int:
        return int(session.get(CaptureRow, authorization_id).refunded_fen)

    time.sleep(1.5)  # the batch commits (the server sees the cancel a little after the client)
    harness.run(harness.app.authorizations.to_the_end.finished())

    assert harness.app.database.transaction(refunded) == 1_000
    assert figures(relationships, quota) == (8_000, 0, 2_000)
    # the till's retry: the same answer, no second refund
    refund(authorizations, HOSPITAL, authorization_id, 1_000, key=key)
    assert harness.app.database.transaction(refunded) == 1_000
    assert figures(relationships, quota) == (8_000, 0, 2_000)
