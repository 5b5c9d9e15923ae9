"""Refunds on PostgreSQL with several workers, and the group commit they share (an audit's
findings, each test failing before its fix):

- the capture row a refund locks is refreshed from what it locked: SQLAlchemy leaves an object
  already in the session as it was loaded, and a refused refund earlier in the same group
  commit (its savepoint rolled back, and with it its row lock) may have loaded it while another
  worker's refund committed since: the next refund was decided on the stale copy (two refunds
  of 600 accepted against a capture of 1,000, and the other worker's update lost);
- a refund's key is looked up after the capture's lock: a retry on another worker while the
  first call's transaction is open waited for the lock and then decided anew (refused
  REFUND_EXCEEDS_CAPTURED for a refund that was made);
- a unit whose savepoint fails on its release (the final flush: a unique key) is answered with
  the failure, not as made, and the group commit goes on answering the others and later ones
  (before, the unit got two outcomes: its caller was told the refund was made, its Redis
  credits applied, and the group commit's task died on the misaligned answers).

The PostgreSQL tests simulate a second worker with a copy of the AuthorizationService on a
GroupCommit of its own, and force the interleaving by wrapping a batch's submit and watching
pg_stat_activity for the waiting lock."""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import IntegrityError

from authz_server.domain.errors import PolicyRefusal
from authz_server.generated.medwallet.v1 import authorization_pb2
from authz_server.server import convert
from authz_server.server.authorization_handler import _encode_refund
from authz_server.service.idempotency import Idempotency
from authz_server.service.refunds import RefundOutcome
from authz_server.storage.sql.group_commit import GroupCommit
from authz_server.storage.sql.tables import (
    CaptureRow,
    IdempotencyRecordRow,
    LedgerEntryRow,
    RefundRow,
)
from tests.harness import Harness, new_id
from tests.test_settlement_races import World

postgresql_only = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL", "").startswith("postgresql"),
    reason="PostgreSQL READ COMMITTED row locks, several writers (SQLite has one at a time)",
)
MERCHANT = "race-hospital"


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    yield world
    world.close()


def call_for(authorization_id: str, fen: int) -> tuple[int, Idempotency[Any]]:
    request = authorization_pb2.RefundRequest(
        authorization_id=authorization_id, amount_fen=fen, idempotency_key=new_id("refund")
    )
    call = Idempotency(
        f"refund:{MERCHANT}", request.idempotency_key, convert.digest(request), _encode_refund
    )
    return fen, call


def second_worker(world: World) -> tuple[Any, GroupCommit]:
    """Another worker: the same service code with a group commit (a transaction) of its own;
    the caller stops the group commit. Without the batch's quota locks taken first
    (lock_refund_quotas): they would keep its refund waiting for this worker's batch, and these
    tests check the refund's own locks, which still guard a capture its batch did not lock."""
    harness = world.harness
    other_commit = GroupCommit(harness.app.database)

    async def start() -> None:
        other_commit.start()

    harness.run(start())
    other_worker = copy.copy(harness.app.authorizations)
    other_worker.refunds = copy.copy(other_worker.refunds)
    other_worker.refunds.group_commit = other_commit
    return other_worker, other_commit


@postgresql_only
def test_a_refund_after_a_refused_one_in_its_batch_cannot_exceed_the_capture(
    world: World,
) -> None:
    harness = world.harness
    app = harness.app
    loop = harness.loop
    world.capture()  # 1,000 fen captured
    authorization_id = world.hold.authorization_id
    service = app.authorizations
    other_worker, other_commit = second_worker(world)

    batch = service.group_commit
    waiting: list[tuple[Any, asyncio.Future[Any]]] = []
    real_submit = batch.submit

    def run_other_workers_refund(session: Any) -> None:
        """Between the refused refund's SAVEPOINT rollback and the next refund of this batch:
        another worker refunds 600 of the same capture and commits."""
        fen, call = call_for(authorization_id, 600)
        asyncio.run_coroutine_threadsafe(
            other_worker.refund(MERCHANT, authorization_id, fen, call), loop
        ).result(20)

    async def one_batch(work: Any, **_options: Any) -> Any:
        """Puts the first two refunds into one batch, in order; the second one's work first
        lets the other worker's refund through. Without their lock keys: the batch's quota
        locks (lock_refund_quotas) would keep the other worker's refund waiting until this batch
        commits; what is checked here is the unit's own refresh of the capture row, which still
        guards a capture its batch did not lock first (committed after the batch read it)."""
        future: asyncio.Future[Any] = loop.create_future()
        if waiting:
            first_work = work

            def second(session: Any, work: Any = first_work) -> Any:
                run_other_workers_refund(session)
                return work(session)

            work = second
        waiting.append((work, future))
        if len(waiting) == 2:
            batch.pending.extend(waiting)
            batch.wakeup.set()
        return await future

    batch.submit = one_batch  # type: ignore[method-assign]
    try:
        over, over_call = call_for(authorization_id, 1_500)  # refused: beyond the capture
        refused_future = asyncio.run_coroutine_threadsafe(
            service.refund(MERCHANT, authorization_id, over, over_call), loop
        )
        deadline = time.monotonic() + 10
        while not waiting:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fen, call = call_for(authorization_id, 600)
        second_future = asyncio.run_coroutine_threadsafe(
            service.refund(MERCHANT, authorization_id, fen, call), loop
        )
        with pytest.raises(PolicyRefusal):
            refused_future.result(30)
        try:
            second_future.result(30)
            second = "ACCEPTED"
        except PolicyRefusal as refusal:
            second = refusal.reason
    finally:
        batch.submit = real_submit  # type: ignore[method-assign]
        harness.run(other_commit.stop())

    refunded_fen, refund_rows_fen, ledger_fen = app.database.transaction(
        lambda session: _totals(session, authorization_id)
    )
    # 1,000 captured; the other worker refunded 600: a second 600 is beyond the capture.
    assert (second, refunded_fen, refund_rows_fen, ledger_fen) == (
        "REFUND_EXCEEDS_CAPTURED",
        600,
        600,
        600,
    )


@postgresql_only
@pytest.mark.parametrize("refund_fen", [1_000, 400])
def test_a_refund_retried_on_another_worker_while_the_first_commits_gets_the_first_answer(
    world: World, refund_fen: int
) -> None:
    """Audit finding (PostgreSQL, several workers): Refund looks its key up
    (idempotency.find) before it locks the capture row. A retry with the same key and body on
    another worker, looking while the first call's transaction is still open, finds no record,
    waits for the capture's lock and then decides anew: a full refund's retry is refused
    REFUND_EXCEEDS_CAPTURED (the till is told its refund failed, though it was made); a partial
    one's fails on the records' unique key when its SAVEPOINT is released, and is then answered
    as a new refund made (see the last test: group_commit's outcome misalignment)."""
    harness = world.harness
    app = harness.app
    loop = harness.loop
    world.capture()  # 1,000 fen captured
    authorization_id = world.hold.authorization_id
    service = app.authorizations
    other_worker, other_commit = second_worker(world)
    fen, call = call_for(authorization_id, refund_fen)  # a refund, and its retry
    retry: list[Any] = []
    batch = service.group_commit
    real_submit = batch.submit

    async def retried_meanwhile(work: Any, **options: Any) -> Any:
        def first(session: Any) -> Any:
            answer = work(session)  # written, not committed: the capture row stays locked
            backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            retry.append(
                asyncio.run_coroutine_threadsafe(
                    other_worker.refund(MERCHANT, authorization_id, fen, call), loop
                )
            )
            waits_for(backend)  # the retry waits for a lock this transaction holds
            return answer

        return await real_submit(first, **options)

    def waits_for(backend: int) -> None:
        """Returns once a session of the database waits for a lock `backend` holds (whichever:
        the capture's row, with the fix; before it, the relationship's row or the key's)."""
        engine = create_engine(app.database.url)
        try:
            deadline = time.monotonic() + 20
            with engine.connect() as connection:
                while not connection.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE :backend = ANY(pg_blocking_pids(pid))"
                    ),
                    {"backend": backend},
                ):
                    if time.monotonic() > deadline:
                        sessions = connection.execute(
                            text(
                                "SELECT pid, state, wait_event_type, wait_event, left(query, 80)"
                                " FROM pg_stat_activity WHERE datname = current_database()"
                            )
                        ).all()
                        raise AssertionError(f"the retry never waited for {backend}: {sessions}")
                    time.sleep(0.02)
        finally:
            engine.dispose()

    batch.submit = retried_meanwhile  # type: ignore[method-assign]
    try:
        answer = asyncio.run_coroutine_threadsafe(
            service.refund(MERCHANT, authorization_id, fen, call), loop
        ).result(30)
    finally:
        batch.submit = real_submit  # type: ignore[method-assign]
    try:
        try:
            replayed = retry[0].result(30)
            outcome: Any = (
                "DECIDED ANEW" if isinstance(replayed, RefundOutcome) else bytes(replayed)
            )
        except Exception as error:  # what the till would be told
            outcome = getattr(error, "reason", type(error).__name__)
    finally:
        harness.run(other_commit.stop())
    refunded_fen, refund_rows_fen, ledger_fen = app.database.transaction(
        lambda session: _totals(session, authorization_id)
    )
    assert (outcome, refunded_fen, refund_rows_fen, ledger_fen) == (
        _encode_refund(answer),
        refund_fen,
        refund_fen,
        refund_fen,
    )


def _totals(session: Any, authorization_id: str) -> tuple[int, int, int]:
    """(the capture's refunded figure, the refunds' rows, the ledger's refund rows), in fen."""
    capture = session.get(CaptureRow, authorization_id)
    rows = session.scalar(
        select(func.coalesce(func.sum(RefundRow.amount_fen), 0)).where(
            RefundRow.authorization_id == authorization_id
        )
    )
    ledger = session.scalar(
        select(func.coalesce(func.sum(LedgerEntryRow.amount_fen), 0)).where(
            LedgerEntryRow.authorization_id == authorization_id,
            LedgerEntryRow.kind.in_(["REFUND_TO_QUOTA", "REFUND_TO_ACCOUNT"]),
        )
    )
    return int(capture.refunded_fen), int(rows), int(ledger)


def test_a_unit_whose_savepoint_fails_on_release_fails_alone_and_the_batch_is_answered(
    harness: Harness,
) -> None:
    """Three units in one batch; the middle one leaves a row whose primary key exists already
    unflushed, so its savepoint's release (the flush) fails. It gets the failure; the units
    beside it and a later one get their answers."""
    database = harness.app.database
    scope, key = "refund:group-commit-test", new_id("key")

    def record(session: Any) -> None:
        session.add(
            IdempotencyRecordRow(
                scope=scope,
                idempotency_key=key,
                request_digest="0" * 64,
                response=b"first",
                created_at=datetime.now(UTC),
            )
        )

    database.transaction(record)
    commit = GroupCommit(database)

    async def batch() -> list[Any]:
        commit.start()
        loop = asyncio.get_running_loop()
        works = [lambda session: "before", record, lambda session: "after"]
        futures = [loop.create_future() for _ in works]
        commit.pending.extend(zip(works, futures, strict=True))  # one batch
        commit.wakeup.set()
        answers = await asyncio.wait_for(
            asyncio.gather(*futures, return_exceptions=True), timeout=10
        )
        later = await asyncio.wait_for(commit.submit(lambda session: "later"), timeout=10)
        return [*answers, later]

    try:
        before, failed, after, later = harness.run(batch())
    finally:
        harness.run(commit.stop())
    assert (before, after, later) == ("before", "after", "later")
    assert isinstance(failed, IntegrityError), failed
