"""The audit trail's clean stop writes every record once: stopped while a batch is being
committed (its commit goes on in the SQL thread), it neither loses nor repeats that batch.
On the harness's database kind (SQLite, or PostgreSQL with TEST_DATABASE_URL)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from authz_server.service.audit_trail import AuditRecord, AuditTrail
from authz_server.storage.sql.audit_table import AuditRecordRow
from authz_server.storage.sql.database import Database
from tests.harness import drop_database, fresh_database

RECORDS = 20_000


@pytest.fixture()
def database(tmp_path: Path) -> Iterator[Database]:
    """A database of its own, of the harness's kind, dropped afterwards."""
    url = fresh_database(os.environ.get("TEST_DATABASE_URL"), tmp_path)
    opened = Database(url)
    try:
        yield opened
    finally:
        opened.close()
        drop_database(url)


def test_a_stop_during_a_flush_writes_each_record_once(database: Database) -> None:
    async def record_then_stop() -> None:
        trail = AuditTrail(database)
        trail.start()
        now = datetime.now(UTC)
        trail.record(
            [
                AuditRecord(now, None, "merchant", "m-1", "token:t", "Authorize", "", f"a{n}", "OK")
                for n in range(RECORDS)
            ]
        )
        await asyncio.sleep(0.01)  # its first batch is being committed now
        await trail.stop()

    asyncio.run(record_then_stop())
    rows, distinct = database.transaction(
        lambda session: session.execute(
            select(
                func.count(),
                func.count(AuditRecordRow.authorization_id.distinct()),
            )
        ).one()
    )
    assert (rows, distinct) == (RECORDS, RECORDS)


def test_a_stop_given_up_while_a_flush_runs_still_ends_the_task(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Application.stop bounds each step: a stop cancelled while it waits for the flush in
    progress cancels the background task all the same (it would go on flushing after the
    stop, into a database being closed)."""
    real_write = AuditTrail._write

    def slow(self: AuditTrail, records: list[AuditRecord], connection: Any) -> None:
        time.sleep(0.5)  # a commit that outlasts the stop's bound below
        real_write(self, records, connection)

    monkeypatch.setattr(AuditTrail, "_write", slow)

    async def record_then_stop_in_time() -> bool:
        trail = AuditTrail(database)
        trail.start()
        now = datetime.now(UTC)
        trail.record([AuditRecord(now, None, "merchant", "m-1", "token:t", "rpc", "", "a1", "OK")])
        trail.wake.set()  # flushed now, not in FLUSH_SECONDS
        await asyncio.sleep(0.1)  # its commit is under way in the SQL thread
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(trail.stop(), 0.1)
        assert trail.task is not None
        await asyncio.wait([trail.task], timeout=5)
        return trail.task.cancelled() or trail.task.done()

    assert asyncio.run(record_then_stop_in_time())
