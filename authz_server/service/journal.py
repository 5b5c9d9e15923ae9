"""The journal of authorization decisions, written to SQL in batches off the hot path.

Authorize answers from Redis alone; its decision is queued here and inserted within about
FLUSH_INTERVAL_SECONDS. The queue is bounded: when SQL falls behind that far, new decisions are
still answered and the overflow is counted and logged (Redis keeps the hold itself). A batch
that fails goes back to the head of the queue and is tried again; stop() writes what is queued.

The insert is one prepared statement run with the DBAPI cursor's executemany on plain tuples:
SQLAlchemy's Core executemany of dicts cost most of this module's CPU (per row: parameter
dicts, type processing, statement caching). What SQLAlchemy does to a value on the way in is
still done, by the same bind processors (SQLite stores datetimes as text in its own format).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any

from sqlalchemy import Dialect, Table
from sqlalchemy.orm import Session

from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import AuthorizationRow

log = logging.getLogger(__name__)
# How often queued decisions are written. Each flush is one transaction with a fixed cost of
# ~0.5-1 ms of this process's CPU (the hop to the SQL thread, session, BEGIN, COMMIT; measured
# here on SQLite and PostgreSQL), on top of ~20-25 µs a row. At ~400 decisions/s per worker,
# 0.2 s makes ~80-row batches: the fixed part is ~10 µs a decision instead of ~50 µs at 50 ms.
# What it risks: a crash of this process loses at most that much of the journal, while Redis
# (AOF, fsync every second) still holds those decisions; the journal is needed only once Redis
# has lost data too, and Redis itself loses up to ~1 s then. stop() writes what is queued.
FLUSH_INTERVAL_SECONDS = 0.2
# Rows per transaction. On SQLite the one SQL thread is shared with the group commit of
# captures: a batch of 500 keeps it for ~15 ms at most; a backlog drains in several of them.
MAX_BATCH = 500
MAX_QUEUED = 100_000

AUTHORIZATIONS: Table = AuthorizationRow.__table__  # type: ignore[assignment]
# The journal's columns in the table's order (storage/sql/tables.py is the one mapping); a
# decision is recorded as a dict with these keys, "response" an AuthorizeResponse or bytes.
COLUMNS: tuple[str, ...] = tuple(column.name for column in AUTHORIZATIONS.columns)
_RESPONSE = COLUMNS.index("response")


@dataclass(frozen=True)
class _Insert:
    """The INSERT of journal rows for one dialect: SQL text, and the positions of the values
    that SQLAlchemy's column types would convert, with their converters."""

    sql: str
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]

    @classmethod
    def for_dialect(cls, dialect: Dialect) -> _Insert:
        quote = dialect.identifier_preparer.quote
        marker = "?" if dialect.paramstyle == "qmark" else "%s"
        # ON CONFLICT DO NOTHING (no target: any unique constraint), on SQLite and PostgreSQL:
        # a replayed decision is journaled once; a key reused for another beneficiary is kept
        # out by the unique (merchant, key) index.
        sql = (
            f"INSERT INTO {quote(AUTHORIZATIONS.name)}"
            f" ({', '.join(quote(name) for name in COLUMNS)})"
            f" VALUES ({', '.join([marker] * len(COLUMNS))}) ON CONFLICT DO NOTHING"
        )
        processors = []
        for index, column in enumerate(AUTHORIZATIONS.columns):
            processor = column.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors.append((index, processor))
        return cls(sql, tuple(processors))

    def values(self, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
        get = itemgetter(*COLUMNS)
        processors = self.processors
        values = []
        for row in rows:
            value = list(get(row))
            response = value[_RESPONSE]
            if not isinstance(response, bytes):
                # Responses arrive as messages; serializing them here keeps it off the hot path.
                value[_RESPONSE] = response.SerializeToString()
            for index, process in processors:
                value[index] = process(value[index])
            values.append(tuple(value))
        return values


class Journal:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.queue: list[dict[str, Any]] = []
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None
        self._insert = _Insert.for_dialect(database.engine.dialect)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="journal")

    def record(self, row: dict[str, Any]) -> None:
        """Queues one decision: a dict with a value for every name in COLUMNS."""
        if len(self.queue) >= MAX_QUEUED:
            self.dropped += 1
            log.error("journal queue full; decision %s not journaled", row["authorization_id"])
            return
        self.queue.append(row)

    async def flush(self) -> None:
        while self.queue:
            batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
            try:
                await self.database.run(partial(self._write, rows=batch))
            except Exception:
                log.exception("journal write failed; will retry %d decisions", len(batch))
                self.queue[:0] = batch
                raise

    def _write(self, session: Session, *, rows: list[dict[str, Any]]) -> None:
        values = self._insert.values(rows)
        # The session's connection, so the transaction is Database.run's (SQLite: BEGIN
        # IMMEDIATE), committed or rolled back with it.
        dbapi_connection = session.connection().connection.dbapi_connection
        assert dbapi_connection is not None
        cursor = dbapi_connection.cursor()
        try:
            cursor.executemany(self._insert.sql, values)
        finally:
            cursor.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            try:
                await self.flush()
            except Exception:
                await asyncio.sleep(1)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        try:
            await self.flush()
        except Exception:
            log.exception("journal: %d decisions not written at shutdown", len(self.queue))
