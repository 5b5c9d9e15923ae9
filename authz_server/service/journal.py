"""The journal of authorization decisions, written to SQL in batches off the hot path.

Authorize answers from Redis alone; its decision is queued here and inserted within about
FLUSH_INTERVAL_SECONDS. The queue is bounded: when SQL falls behind that far, new decisions are
still answered and the overflow is counted and logged (Redis keeps the hold itself). A batch
that fails because SQL is unavailable goes back to the head of the queue and is tried again; a
batch SQL refuses for another reason (a row it will never take) is written row by row, and only
the rows refused on their own are set aside, counted and logged, so one bad row cannot block
the journal. stop() writes what is queued.

The insert is one statement run with the DBAPI cursor's executemany on plain tuples
(storage/sql/dbapi.py): SQLAlchemy's Core executemany of dicts cost most of this module's
CPU.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial
from operator import itemgetter
from typing import Any

from sqlalchemy import Table
from sqlalchemy.orm import Session

from authz_server.domain.errors import Unavailable
from authz_server.observability import metrics
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.dbapi import BulkInsert
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


def _tuples(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """The rows' values in COLUMNS order, responses serialized (off the hot path)."""
    get = itemgetter(*COLUMNS)
    values = []
    for row in rows:
        value = list(get(row))
        response = value[_RESPONSE]
        if not isinstance(response, bytes):
            value[_RESPONSE] = response.SerializeToString()
        values.append(value)
    return values


class Journal:
    def __init__(
        self, database: Database, flush_interval_seconds: float = FLUSH_INTERVAL_SECONDS
    ) -> None:
        self.database = database
        # Per journal, not read from the module at every round: a test that slows one journal
        # down leaves every other one (the test session's server's) as it was.
        self.flush_interval_seconds = flush_interval_seconds
        self.queue: list[dict[str, Any]] = []
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None
        # ON CONFLICT DO NOTHING: a replayed decision is journaled once; a key reused for
        # another beneficiary is kept out by the unique (merchant, key) index.
        self._insert = BulkInsert.of(AUTHORIZATIONS, database.engine.dialect, skip_conflicts=True)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="journal")

    def record(self, row: dict[str, Any]) -> None:
        """Queues one decision: a dict with a value for every name in COLUMNS."""
        if len(self.queue) >= MAX_QUEUED:
            self.dropped += 1
            metrics.journal_rejected.inc()
            log.error("journal queue full; decision %s not journaled", row["authorization_id"])
            return
        self.queue.append(row)

    async def flush(self) -> None:
        while self.queue:
            batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
            try:
                await self.database.run(partial(self._write, rows=batch))
            except Unavailable:  # SQL down or locked: the whole batch waits for the next try
                log.exception("journal write failed; will retry %d decisions", len(batch))
                self.queue[:0] = batch
                raise
            except Exception:  # a row SQL refuses: find it, so it cannot block the others
                log.exception("journal batch of %d refused; writing it row by row", len(batch))
                await self._write_each(batch)

    async def _write_each(self, batch: list[dict[str, Any]]) -> None:
        for index, row in enumerate(batch):
            try:
                await self.database.run(partial(self._write, rows=[row]))
            except Unavailable:
                self.queue[:0] = batch[index:]
                raise
            except Exception:
                self.dropped += 1
                metrics.journal_rejected.inc()
                log.exception("journal: decision %s refused by SQL", row["authorization_id"])

    def _write(self, session: Session, *, rows: list[dict[str, Any]]) -> None:
        # The session's connection, so the transaction is Database.run's (SQLite: BEGIN
        # IMMEDIATE), committed or rolled back with it.
        self._insert.run(session.connection(), _tuples(rows))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_seconds)
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
