"""The decision journal's raw executemany writes what SQLAlchemy would have written: the ORM
reads every column back as recorded, datetimes compare in SQL, a replayed decision is kept once
and a key SQL answered before under another authorization gets that stored decision back, a
batch SQL cannot take answers UNAVAILABLE, and a row SQL refuses fails alone. On SQLite and, with
TEST_DATABASE_URL, PostgreSQL (the harness's database)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from authz_server.domain.errors import Unavailable
from authz_server.generated.medwallet.v1 import authorization_pb2
from authz_server.observability import metrics
from authz_server.service import journal as journal_module
from authz_server.service.journal import COLUMNS, Journal, StoredDecision
from authz_server.storage.sql import records
from authz_server.storage.sql.tables import AuthorizationRow
from tests.harness import Harness, new_id


def decision(**changes: Any) -> dict[str, Any]:
    authorization_id = uuid.uuid4().hex
    created = datetime.now(UTC).replace(microsecond=123456)
    row: dict[str, Any] = {
        "authorization_id": authorization_id,
        "merchant_id": new_id("journal-merchant"),
        "beneficiary_id": new_id("journal-beneficiary"),
        "purpose": "PHARMACY",
        "decision": "PARTIALLY_APPROVED",
        "decline_reason": None,
        "requested_fen": 4_000,
        "approved_fen": 2_500,
        "funding": "rel-1=2000;rel-2=500",
        "idempotency_key": new_id("key"),
        "request_digest": "ab" * 32,
        "response": authorization_pb2.AuthorizeResponse(
            authorization_id=authorization_id,
            decision=authorization_pb2.DECISION_PARTIALLY_APPROVED,
            approved_amount_fen=2_500,
        ),
        "created_at": created,
        "expires_at": created + timedelta(minutes=15),
    }
    row.update(changes)
    return row


def stored(harness: Harness, *authorization_ids: str) -> dict[str, AuthorizationRow]:
    def read(session: Session) -> dict[str, AuthorizationRow]:
        query = select(AuthorizationRow).where(
            AuthorizationRow.authorization_id.in_(authorization_ids)
        )
        return {row.authorization_id: row for row in session.scalars(query)}

    return harness.app.database.transaction(read)


def write_all(harness: Harness, journal: Journal, rows: list[dict[str, Any]]) -> list[Any]:
    """Writes the rows as concurrent Authorize calls would; each one's outcome (or error)."""

    async def write() -> list[Any]:
        journal.start()
        try:
            return await asyncio.gather(
                *(journal.write(dict(row)) for row in rows), return_exceptions=True
            )
        finally:
            await journal.stop()

    return harness.run(write())


def test_rows_read_back_through_the_orm_as_recorded(harness: Harness) -> None:
    journal = Journal(harness.app.database)
    declined = decision(
        decision="DECLINED",
        decline_reason="INSUFFICIENT_QUOTA",
        approved_fen=0,
        funding="",
        expires_at=None,
        response=b"\x10\x03",  # already serialized: written as it is
    )
    partial = decision()
    assert write_all(harness, journal, [declined, partial]) == [None, None]
    found = stored(harness, declined["authorization_id"], partial["authorization_id"])
    for row in (declined, partial):
        back = found[row["authorization_id"]]
        for column in COLUMNS:
            value = getattr(back, column)
            if column in ("created_at", "expires_at"):
                value = records.utc(value) if value is not None else None
            expected = row[column]
            if column == "response" and not isinstance(expected, bytes):
                expected = expected.SerializeToString()
            assert value == expected, column
        assert back.voided_at is None


def test_datetimes_compare_in_sql_like_the_orm_writes_them(harness: Harness) -> None:
    """Queries select the journal by time (created_at >= a month's start; open holds by
    expires_at > now), so the raw insert must store times as the ORM compares them."""
    journal = Journal(harness.app.database)
    moment = datetime(2031, 5, 31, 16, 0, tzinfo=UTC)  # midnight 1 June, Beijing time
    before, at, after = (
        decision(created_at=moment - timedelta(microseconds=1)),
        decision(created_at=moment),
        decision(created_at=moment + timedelta(seconds=1)),
    )
    merchant = new_id("journal-cutoff")
    for row in (before, at, after):
        row["merchant_id"] = merchant
    write_all(harness, journal, [before, at, after])

    def since(session: Session) -> set[str]:
        query = select(AuthorizationRow.authorization_id).where(
            AuthorizationRow.merchant_id == merchant, AuthorizationRow.created_at >= moment
        )
        return set(session.scalars(query))

    assert harness.app.database.transaction(since) == {
        at["authorization_id"],
        after["authorization_id"],
    }


def test_a_replay_is_kept_once_and_a_key_answered_before_gets_the_stored_decision(
    harness: Harness,
) -> None:
    journal = Journal(harness.app.database)
    first = decision()
    replay = dict(first, approved_fen=1)  # same authorization id
    reused = decision(  # another authorization under the same (merchant, key)
        merchant_id=first["merchant_id"], idempotency_key=first["idempotency_key"]
    )
    other = decision()
    assert write_all(harness, journal, [first]) == [None]
    # One batch: the conflicts do not stop the others.
    outcomes = write_all(harness, journal, [replay, reused, other])
    assert outcomes == [
        None,
        StoredDecision(
            first["authorization_id"],
            first["request_digest"],
            first["response"].SerializeToString(),
        ),
        None,
    ]
    found = stored(
        harness, first["authorization_id"], reused["authorization_id"], other["authorization_id"]
    )
    assert set(found) == {first["authorization_id"], other["authorization_id"]}
    assert found[first["authorization_id"]].approved_fen == first["approved_fen"]


def test_a_batch_sql_cannot_take_answers_unavailable_and_the_next_one_is_written(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(harness.app.database)
    rows = [decision() for _ in range(3)]
    real_write = Journal._write

    def failing(self: Journal, connection: Connection, *, rows: list[dict[str, Any]]) -> None:
        # what SQLAlchemy raises when the database is locked or the connection is lost
        raise OperationalError("INSERT", None, Exception("the database is away"))

    monkeypatch.setattr(Journal, "_write", failing)
    outcomes = write_all(harness, journal, rows)
    assert all(isinstance(outcome, Unavailable) for outcome in outcomes)
    assert stored(harness, *(row["authorization_id"] for row in rows)) == {}
    monkeypatch.setattr(Journal, "_write", real_write)
    assert write_all(harness, journal, rows) == [None] * 3  # the callers' retries
    assert len(stored(harness, *(row["authorization_id"] for row in rows))) == 3


def test_a_row_sql_refuses_fails_alone_and_the_others_are_written(harness: Harness) -> None:
    """One row SQL will never take (here a decision without a merchant: NOT NULL) must not
    fail the others: its batch is written row by row and only that row's caller fails."""
    journal = Journal(harness.app.database)
    good = [decision() for _ in range(3)]
    bad = decision(merchant_id=None)
    rejected_before = metrics.journal_rejected._value.get()
    outcomes = write_all(harness, journal, [good[0], bad, good[1], good[2]])
    assert [outcome is None for outcome in outcomes] == [True, False, True, True]
    assert isinstance(outcomes[1], Exception)
    assert metrics.journal_rejected._value.get() == rejected_before + 1
    found = stored(harness, bad["authorization_id"], *(row["authorization_id"] for row in good))
    assert set(found) == {row["authorization_id"] for row in good}
    assert write_all(harness, journal, [decision()]) == [None]  # and the journal goes on


def test_batches_are_bounded(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "MAX_BATCH", 7)
    journal = Journal(harness.app.database)
    batches: list[int] = []
    real_write = Journal._write

    def counting(self: Journal, connection: Connection, *, rows: list[dict[str, Any]]) -> Any:
        batches.append(len(rows))
        return real_write(self, connection, rows=rows)

    monkeypatch.setattr(Journal, "_write", counting)
    merchant = new_id("journal-batches")
    write_all(harness, journal, [decision(merchant_id=merchant) for _ in range(20)])
    assert sum(batches) == 20 and max(batches) == 7

    def count(session: Session) -> int:
        query = select(func.count()).where(AuthorizationRow.merchant_id == merchant)
        return int(session.scalar(query) or 0)

    assert harness.app.database.transaction(count) == 20


def test_a_stop_during_a_commit_answers_that_batch(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while a batch commits in the SQL thread, the journal waits for that commit and
    answers its callers; cancelled inside it, it would drop their futures (each caller left
    waiting though its row is written) and go on to the next batch beside the commit."""
    monkeypatch.setattr(journal_module, "MAX_BATCH", 5)
    journal = Journal(harness.app.database)
    real_write = Journal._write
    committing = threading.Event()

    def slow(self: Journal, connection: Connection, *, rows: list[dict[str, Any]]) -> Any:
        committing.set()
        time.sleep(0.3)  # the stop comes while this transaction is open
        return real_write(self, connection, rows=rows)

    monkeypatch.setattr(Journal, "_write", slow)
    rows = [decision() for _ in range(12)]

    async def write_then_stop() -> tuple[int, list[Any]]:
        journal.start()
        calls = [asyncio.ensure_future(journal.write(dict(row))) for row in rows]
        while not committing.is_set():
            await asyncio.sleep(0.005)
        await journal.stop()
        _, pending = await asyncio.wait(calls, timeout=5)
        for call in pending:
            call.cancel()
        return len(pending), [call.result() for call in calls if call not in pending]

    unanswered, outcomes = harness.run(write_then_stop())
    assert unanswered == 0
    assert outcomes == [None] * len(rows)
    assert len(stored(harness, *(row["authorization_id"] for row in rows))) == len(rows)


def test_a_stop_while_decisions_keep_coming_ends(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows still arriving as fast as batches commit (calls a stop step that overran left
    running) do not hold the stop: after stop() begins a write is refused UNAVAILABLE, what was
    queued is written, and the background task ends."""
    journal = Journal(harness.app.database)
    real_write = Journal._write

    def slow(self: Journal, connection: Connection, *, rows: list[dict[str, Any]]) -> Any:
        time.sleep(0.05)  # a 50 ms commit
        return real_write(self, connection, rows=rows)

    monkeypatch.setattr(Journal, "_write", slow)

    async def scenario() -> tuple[bool, bool, list[Any]]:
        journal.start()
        calls: list[asyncio.Future[Any]] = []

        async def producer() -> None:  # a decision every 10 ms
            while True:
                calls.append(asyncio.ensure_future(journal.write(decision())))
                await asyncio.sleep(0.01)

        feeding = asyncio.ensure_future(producer())
        await asyncio.sleep(0.2)
        try:
            await asyncio.wait_for(journal.stop(), 3)
            stopped = True
        except TimeoutError:
            stopped = False
        assert journal.task is not None
        ended = journal.task.done()
        feeding.cancel()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        return stopped, ended, outcomes

    stopped, ended, outcomes = harness.run(scenario())
    assert stopped and ended
    assert all(outcome is None or isinstance(outcome, Unavailable) for outcome in outcomes)
    assert any(outcome is None for outcome in outcomes)
    assert isinstance(outcomes[-1], Unavailable)  # asked after the stop began
