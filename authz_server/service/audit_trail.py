"""The audit trail's writer and queries (table: storage/sql/audit_table.py).

Calls add records to a buffer (no I/O on the call's path); a background task inserts them in
batches, one transaction per batch, every FLUSH_SECONDS or as soon as BATCH_ROWS are waiting.
A batch SQL refuses stays in the buffer and is tried again. `stop` writes what is left, so a
clean stop loses nothing. Only a buffer past MAX_BUFFERED_ROWS (SQL down for long) drops the
oldest records, counted in medwallet_audit_dropped_total and logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Protocol

from sqlalchemy import Connection, and_, delete, or_, select
from sqlalchemy.orm import Session

from authz_server.domain.errors import InvalidArgument, Unavailable
from authz_server.observability import metrics
from authz_server.service.journal import stop_between_flushes
from authz_server.storage.sql.audit_table import AuditRecordRow
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.dbapi import BulkInsert

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.2
BATCH_ROWS = 1000
MAX_BUFFERED_ROWS = 200_000
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


@dataclass(frozen=True)
class AuditRecord:
    occurred_at: datetime
    person_id: str | None
    principal_kind: str
    principal_id: str
    credential: str
    rpc: str
    relationship_id: str
    authorization_id: str
    outcome: str

    def values(self) -> tuple[object, ...]:
        """The insert's values, in COLUMNS order."""
        return tuple(getattr(self, name) for name in COLUMNS)


# the audit_records columns an AuditRecord fills (record_id is the table's own)
COLUMNS = tuple(f.name for f in fields(AuditRecord))


@dataclass(frozen=True)
class StoredRecord:
    record_id: int
    record: AuditRecord


def buffer_within_bound(buffer: deque[AuditRecord], records: list[AuditRecord], why: str) -> None:
    """Appends the records, dropping the oldest past MAX_BUFFERED_ROWS (counted and logged)."""
    buffer.extend(records)
    overflow = len(buffer) - MAX_BUFFERED_ROWS
    if overflow > 0:
        for _ in range(overflow):
            buffer.popleft()
        metrics.audit_dropped.inc(overflow)
        log.error("audit buffer full (%s): %d oldest records dropped", why, overflow)


class AuditSink(Protocol):
    """Where the audit wrapper (server/audit.py) hands its records: an AuditTrail, or a ledger
    writer process's (authz_server/ledger/client.py)."""

    def record(self, records: list[AuditRecord]) -> None: ...

    async def flush(self) -> int:
        """Returns once the records recorded so far are committed; the count written."""
        ...


class AuditTrail:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.buffer: deque[AuditRecord] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.flushing = asyncio.Lock()
        # (size, seconds) of each batch; a ledger writer process forwards them to its worker
        self.observe: Callable[[int, float], None] = metrics.BatchObserver("audit")
        # the DBAPI's executemany, as the journal writes: the ORM's bulk insert was a seventh
        # of the SQL thread's samples in an Authorize profile (loadtest/RESULTS.md)
        self._insert = BulkInsert.of(
            AuditRecordRow.__table__,  # type: ignore[arg-type]
            database.engine.dialect,
            COLUMNS,
        )

    def record(self, records: list[AuditRecord]) -> None:
        buffer_within_bound(self.buffer, records, "SQL not answering?")
        if len(self.buffer) >= BATCH_ROWS:
            self.wake.set()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), FLUSH_SECONDS)
            self.wake.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("audit batch not written; retrying")
                await asyncio.sleep(FLUSH_SECONDS)

    async def flush(self) -> int:
        """Writes everything buffered now, in batches; returns the records written."""
        written = 0
        async with self.flushing:
            while self.buffer:
                batch = [self.buffer[i] for i in range(min(BATCH_ROWS, len(self.buffer)))]
                started = time.perf_counter()
                try:
                    await self.database.run_core(partial(self._write, batch))
                    done = len(batch)
                except Unavailable:
                    raise  # SQL not answering: the batch stays, tried again
                except Exception:
                    # SQL refused the batch itself: row by row, so one bad row cannot hold the
                    # trail back for ever; a row refused on its own is dropped, counted, logged
                    written += await self._one_by_one(len(batch))
                    continue
                self.observe(done, time.perf_counter() - started)
                for _ in batch:
                    self.buffer.popleft()
                written += done
                metrics.audit_records.inc(done)
        return written

    async def _one_by_one(self, count: int) -> int:
        """Writes the first `count` buffered records one a transaction, taking each off the
        buffer once written or refused (so an Unavailable midway leaves only the rest)."""
        done = 0
        for _ in range(count):
            record = self.buffer[0]
            try:
                await self.database.run_core(partial(self._write, [record]))
                done += 1
                metrics.audit_records.inc()
            except Unavailable:
                raise
            except Exception:
                metrics.audit_dropped.inc()
                log.exception("audit record refused by SQL, dropped (rpc %s)", record.rpc)
            self.buffer.popleft()
        return done

    def _write(self, records: list[AuditRecord], connection: Connection) -> None:
        self._insert.run(connection, [record.values() for record in records])

    async def stop(self) -> None:
        """Stops the background task and writes what is left (the clean stop's last flush)."""
        if self.task is not None:
            # Not cancelled inside a flush: the batch it was committing would commit on in the
            # SQL thread while the buffer still held it, and the last flush would write it twice.
            await stop_between_flushes(self.task, self.flushing)
        await self.flush()


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def encode_token(moment: datetime, record_id: int) -> str:
    text = f"{_utc(moment).isoformat()}|{record_id}"
    return base64.urlsafe_b64encode(text.encode()).decode()


def decode_token(token: str) -> tuple[datetime, int] | None:
    if not token:
        return None
    try:
        moment, text = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        # OverflowError: an instant whose UTC conversion leaves datetime's range (year 1 at
        # +01:00); a record id outside int64 SQL cannot compare with (SQLite raised).
        record_id = int(text)
        if not 0 <= record_id < 2**63:
            raise ValueError("record id out of range")
        return _utc(datetime.fromisoformat(moment)), record_id
    except (ValueError, UnicodeDecodeError, OverflowError) as error:
        raise InvalidArgument("page_token", "not a token this service issued") from error


def _stored(row: AuditRecordRow) -> StoredRecord:
    record = AuditRecord(
        occurred_at=_utc(row.occurred_at),
        person_id=row.person_id,
        principal_kind=row.principal_kind,
        principal_id=row.principal_id,
        credential=row.credential,
        rpc=row.rpc,
        relationship_id=row.relationship_id,
        authorization_id=row.authorization_id,
        outcome=row.outcome,
    )
    return StoredRecord(row.record_id, record)


def person_access(
    session: Session,
    person_id: str,
    start: datetime,
    end: datetime,
    page_size: int,
    page_token: str,
) -> tuple[list[StoredRecord], str]:
    """Records of one person in [start, end), oldest first; (page, next page token or "")."""
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"must be 0 to {MAX_PAGE_SIZE}")
    size = page_size or DEFAULT_PAGE_SIZE
    row = AuditRecordRow
    query = select(row).where(
        row.person_id == person_id, row.occurred_at >= _utc(start), row.occurred_at < _utc(end)
    )
    after = decode_token(page_token)
    if after is not None:
        moment, record_id = after
        query = query.where(
            or_(
                row.occurred_at > moment, and_(row.occurred_at == moment, row.record_id > record_id)
            )
        )
    rows = session.scalars(query.order_by(row.occurred_at, row.record_id).limit(size + 1)).all()
    page = [_stored(found) for found in rows[:size]]
    token = ""
    if len(rows) > size:
        last = page[-1]
        token = encode_token(last.record.occurred_at, last.record_id)
    return page, token


def purge(session: Session, retention_days: int, now: datetime | None = None) -> int:
    """Deletes records older than the retention period; returns how many."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    result = session.execute(delete(AuditRecordRow).where(AuditRecordRow.occurred_at < cutoff))
    return int(result.rowcount)  # type: ignore[attr-defined]
