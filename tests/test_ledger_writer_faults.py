"""The ledger writer process (MEDWALLET_LEDGER_WRITER=process) killed or stalled under load,
stopped with its worker, and sent what its worker holds within its own bounds.

- tills with 0.3 s deadlines that never retry (a cashier who cancels) pay while the writer is
  killed with -9, then stalled (SIGSTOP) past the frame deadline (the worker kills it): every
  hold Redis has is journaled after, each family's held figure what SQL approved for it;
- a worker's stop, bounded by its step (Application.stop), leaves no stalled writer running;
- audit records the client keeps within its bound (MAX_BUFFERED_ROWS) are not lost to the
  frame limit when sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import string
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from authz_server.storage.sql.audit_table import AuditRecordRow
from tests.harness import Harness, new_id
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize_request,
    family,
    wait_for,
)
from tests.test_redis_loss import served_stubs
from tests.test_unanswered_authorize import journaled_fen


@pytest.fixture(scope="module")
def lossy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    harness = Harness(tmp_path_factory.mktemp("ledger-writer-faults"), ledger_writer="process")
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def stubs(lossy: Harness) -> Iterator[Any]:
    yield from served_stubs(lossy)


def writer_pid(lossy: Harness) -> int:
    ledger_client = lossy.app.ledger
    assert ledger_client is not None and ledger_client.process is not None
    return ledger_client.process.pid


def settled(harness: Harness) -> None:
    harness.run(harness.app.authorizations.to_the_end.finished())
    wait_for(lambda: harness.app.authorizations.late_journal.waiting == 0, seconds=120)


def test_no_hold_is_left_unjournaled_when_the_writer_is_killed_or_stalled(
    lossy: Harness, stubs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from authz_server.ledger import client as ledger_client

    monkeypatch.setattr(ledger_client, "FRAME_DEADLINE_SECONDS", 1.5)
    registry, relationships, authorizations, _ = stubs
    families = [family(registry, relationships, 500_000) for _ in range(8)]
    stop = threading.Event()
    answers: list[str] = []

    def till(number: int) -> None:
        fam = families[number]
        while not stop.is_set():
            try:
                answer = authorizations.Authorize(
                    authorize_request(fam.beneficiary_id, MEDICAL, 100),
                    metadata=HOSPITAL,
                    timeout=1.0,
                )
                answers.append("approved" if answer.decision == APPROVED else "declined")
            except grpc.RpcError as error:
                answers.append(error.code().name)

    tills = [threading.Thread(target=till, args=(n,)) for n in range(len(families))]
    for thread in tills:
        thread.start()
    pids = []
    try:
        # payments going through the writer (however long a loaded machine takes to start it)
        wait_for(lambda: "approved" in answers, seconds=60)
        pids.append(writer_pid(lossy))
        os.kill(pids[-1], signal.SIGKILL)  # frames in flight
        # Replaced at the next frame; how soon depends on the machine's load, not on a fixed
        # sleep (a loaded CI machine's tills may send nothing for a while).
        wait_for(lambda: writer_pid(lossy) != pids[0], seconds=60)
        time.sleep(1.0)
        pids.append(writer_pid(lossy))
        os.kill(pids[-1], signal.SIGSTOP)  # stalled: answered after SIGCONT
        time.sleep(0.8)
        os.kill(pids[-1], signal.SIGCONT)
        time.sleep(1.0)
        pids.append(writer_pid(lossy))
        os.kill(pids[-1], signal.SIGSTOP)  # stalled past the frame deadline: killed by the worker
        # at the deadline of the first frame it sends the stalled writer
        wait_for(lambda: writer_pid(lossy) != pids[-1], seconds=60)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in tills:
            thread.join(30)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert "approved" in answers
    assert writer_pid(lossy) not in pids[::2]
    settled(lossy)
    wrong = []
    for fam in families:
        (relationship_id,) = fam.relationship_ids
        available, held = hot_figures(lossy, fam.beneficiary_id, relationship_id)
        _, approved = journaled_fen(lossy, fam.beneficiary_id)
        unused = ledger(lossy, relationship_id).unused_fen
        if held != approved or available + held != unused:
            wrong.append((fam.beneficiary_id, available, held, approved, unused))
    counted = {name: answers.count(name) for name in sorted(set(answers))}
    assert not wrong, (wrong, counted)


def _client(tmp_path: Path, lossy: Harness) -> Any:
    from authz_server.ledger.client import LedgerClient, WriterCommand

    return LedgerClient(
        WriterCommand(
            socket=tmp_path / "w.sock",
            database_url=lossy.database_url,
            redis_url=lossy.redis_url,
            redis_timeout_seconds=0.5,
            log_level="WARNING",
            event_loop="auto",
        )
    )


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_stop_within_its_step_leaves_no_stalled_writer_running(
    tmp_path: Path, lossy: Harness
) -> None:
    """Application.stop gives the audit trail's stop (LedgerClient.close) STOP_STEP_SECONDS;
    close waited STOP_SECONDS (longer) for a writer that does not exit before it killed it, so
    the step was cancelled first and a stalled writer was left running, its worker gone: on
    SQLite it holds the database's write lock, on PostgreSQL the journal's fence (every rebuild
    waits on it), for ever."""
    from authz_server.server.app import STOP_STEP_SECONDS, bounded_step

    async def scenario() -> int:
        client = _client(tmp_path, lossy)
        from tests.test_ledger_writer import _row

        await client.journal.write(_row())  # started, answering
        assert client.process is not None
        pid = client.process.pid
        os.kill(pid, signal.SIGSTOP)  # stalled (a debugger, a frozen cgroup, a hung call)
        await bounded_step("audit_trail", client.audit.stop, STOP_STEP_SECONDS)
        await asyncio.sleep(0.5)
        return pid

    pid = asyncio.run(scenario())
    try:
        assert not _running(pid), "the stalled writer outlived its worker's stop"
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_audit_records_kept_within_their_bound_are_written_when_sent(
    tmp_path: Path, lossy: Harness
) -> None:
    """The client keeps up to MAX_BUFFERED_ROWS audit records while its writer is away or not
    reading, and sent them all as one frame: with ids at their longest (64 characters) that
    frame is over MAX_FRAME_BYTES, the writer dropped the connection unread, and every record
    was lost, counted nowhere; the flush after it returned as if they were written."""
    from authz_server.domain.errors import Unavailable
    from authz_server.service.audit_trail import MAX_BUFFERED_ROWS, AuditRecord

    prefix = new_id("bulk")[:24]

    def ident() -> str:
        return "".join(random.choices(string.ascii_letters + string.digits, k=64))

    now = datetime.now(UTC)
    count = MAX_BUFFERED_ROWS
    records = [
        AuditRecord(
            occurred_at=now,
            person_id=(prefix + ident())[:64],
            principal_kind="merchant",
            principal_id=ident(),
            credential="token:" + ident(),
            rpc="/medwallet.v1.AuthorizationService/Authorize",
            relationship_id=ident(),
            authorization_id=ident(),
            outcome="FAILED_PRECONDITION",
        )
        for _ in range(count)
    ]

    async def scenario() -> list[Any]:
        client = _client(tmp_path, lossy)
        try:
            client.audit.record(records)  # held: no writer yet
            outcomes: list[Any] = []
            for _ in range(2):
                try:
                    outcomes.append(await asyncio.wait_for(client.audit.flush(), 120))
                except Unavailable as error:
                    outcomes.append(error)
            return outcomes
        finally:
            await client.close()

    outcomes = asyncio.run(scenario())
    written = lossy.app.database.transaction(
        lambda session: session.scalar(
            select(func.count()).where(AuditRecordRow.person_id.like(f"{prefix}%"))
        )
    )
    assert written == count, (written, outcomes)
