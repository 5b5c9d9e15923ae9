"""The journal of authorization decisions, written to SQL in batches off the hot path.

Authorize answers from Redis alone; its decision is queued here and inserted within about
FLUSH_INTERVAL_SECONDS. The queue is bounded: when SQL falls behind that far, new decisions are
still answered and the overflow is counted and logged (Redis keeps the hold itself).
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import AuthorizationRow

log = logging.getLogger(__name__)
FLUSH_INTERVAL_SECONDS = 0.05
MAX_BATCH = 2000
MAX_QUEUED = 100_000


class Journal:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.queue: list[dict[str, Any]] = []
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="journal")

    def record(self, row: dict[str, Any]) -> None:
        if len(self.queue) >= MAX_QUEUED:
            self.dropped += 1
            log.error("journal queue full; decision %s not journaled", row["authorization_id"])
            return
        self.queue.append(row)

    async def flush(self) -> None:
        while self.queue:
            batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
            try:
                await self.database.run(partial(self._insert, rows=batch))
            except Exception:
                log.exception("journal write failed; will retry %d decisions", len(batch))
                self.queue[:0] = batch
                raise

    def _insert(self, session: Session, *, rows: list[dict[str, Any]]) -> None:
        insert = sqlite_insert if self.database.is_sqlite else postgresql_insert
        # A replayed decision is journaled once; a key reused for another beneficiary is kept
        # out by the unique (merchant, key) index and logged.
        # Responses arrive as messages; serializing them here keeps it off the hot path.
        serialized = [
            {**row, "response": row["response"].SerializeToString()}
            if not isinstance(row["response"], bytes)
            else row
            for row in rows
        ]
        # Core executemany on the table (the ORM bulk path costs several times more CPU).
        statement = insert(AuthorizationRow.__table__).on_conflict_do_nothing()  # type: ignore[arg-type]
        session.connection().execute(statement, serialized)

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
