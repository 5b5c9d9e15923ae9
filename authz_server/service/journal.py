"""The journal of authorization decisions: durable in SQL before the till hears the answer.

An approval must survive the loss of Redis (runtime/rebuild.py puts open holds back from these
rows), and an idempotency key answered once must never get a new decision, whatever Redis
forgot. So Authorize waits for its row to be committed (`write`), and the unique index on
(merchant, idempotency key) is the last word on which decision a key has: a decision made anew
for a key SQL already answered (Redis lost its record) is told the stored one instead.

Rows are group-committed: while one batch commits, the next gathers, so the durable write costs
an Authorize the latency of about one commit, not a transaction of its own. A batch that SQL
refuses for another reason than being unavailable is written row by row, so one bad row cannot
fail the others.

The insert is one statement run with the DBAPI cursor's executemany on plain tuples
(storage/sql/dbapi.py): SQLAlchemy's Core executemany of dicts cost most of this module's
CPU.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any, Protocol

from sqlalchemy import Connection, Table, select
from sqlalchemy.orm import Session

from authz_server.domain.errors import Unavailable
from authz_server.observability import metrics
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.dbapi import BulkInsert
from authz_server.storage.sql.journal_fence import for_journaling
from authz_server.storage.sql.tables import DECISION_COLUMNS, AuthorizationRow

log = logging.getLogger(__name__)
# Rows per transaction. On SQLite the one SQL thread is shared with the group commit of
# captures: a batch of 500 keeps it for ~15 ms at most; a backlog drains in several of them.
MAX_BATCH = 500
# Decisions waiting for their commit, at most. Beyond it Authorize answers UNAVAILABLE at once
# (SQL is far behind: waiting would only time out later, with the memory held meanwhile).
MAX_QUEUED = 20_000

AUTHORIZATIONS: Table = AuthorizationRow.__table__  # type: ignore[assignment]
# A decision is a dict with these keys (storage/sql/tables.py), "response" an AuthorizeResponse
# or bytes.
COLUMNS = DECISION_COLUMNS
_RESPONSE = COLUMNS.index("response")


@dataclass(frozen=True)
class StoredDecision:
    """The decision SQL already holds for an idempotency key: another authorization's."""

    authorization_id: str
    request_digest: str
    response: bytes


# What a write comes to: None (this decision is the key's, written now or before), or the
# decision the key already has.
Written = StoredDecision | None


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


# The hot state's generation published now (None while it is missing or being rebuilt).
PublishedGeneration = Callable[[], Coroutine[Any, Any, str | None]]


class DecisionJournal(Protocol):
    """What the authorization service writes its decisions to: a Journal, or a ledger writer
    process's (authz_server/ledger/client.py)."""

    async def write(self, row: dict[str, Any]) -> Written: ...


class GenerationChanged(Unavailable):
    """The decision was made in a generation of the hot state no longer published: Redis was
    lost or is being rebuilt since. Not journaled; the till's retry is decided anew."""


class Journal:
    def __init__(
        self, database: Database, published_generation: PublishedGeneration | None = None
    ) -> None:
        self.database = database
        # A decision row carrying a "generation" is written only while that generation is the
        # published one, read inside the transaction (storage/sql/journal_fence.py).
        self.published_generation = published_generation
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: list[tuple[dict[str, Any], asyncio.Future[Written]]] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        # Held by the background task while it flushes, so stop() never cancels it inside a
        # commit (that batch's callers would be left unanswered).
        self.flushing = asyncio.Lock()
        # Set by stop(): no row is taken after it, so what is queued is finite and is written.
        self.stopping = False
        # (size, seconds) of each batch; a ledger writer process forwards them to its worker
        self.observe: Callable[[int, float], None] = metrics.BatchObserver("journal")
        self.waited = metrics.journal_wait_seconds.observe
        # ON CONFLICT DO NOTHING: a replayed decision is journaled once; a key answered before
        # under another authorization id is kept out by the unique (merchant, key) index and
        # found afterwards (_conflicts).
        self._insert = BulkInsert.of(
            AUTHORIZATIONS, database.engine.dialect, COLUMNS, skip_conflicts=True
        )

    def start(self) -> None:
        self.stopping = False
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self._run(), name="journal")

    async def write(self, row: dict[str, Any]) -> Written:
        """Writes one decision (a dict with a value for every name in COLUMNS) and returns once
        it is committed: None when it is the key's decision, else the one SQL holds for the key.
        Raises Unavailable when SQL does not take it."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        if self.stopping:
            raise Unavailable("the decision journal is stopping; retry")
        if len(self.queue) >= MAX_QUEUED:
            metrics.journal_rejected.inc()
            raise Unavailable("the decision journal is too far behind; retry")
        future: asyncio.Future[Written] = self.loop.create_future()
        self.queue.append((row, future))
        self.wakeup.set()
        queued = time.perf_counter()
        try:
            return await future
        finally:
            self.waited(time.perf_counter() - queued)

    async def flush(self) -> None:
        """Writes every queued decision (each caller gets its outcome)."""
        while self.queue:
            batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
            rows = [row for row, _ in batch]
            futures = [future for _, future in batch]
            outcomes: Sequence[Written | BaseException]
            started = time.perf_counter()
            try:
                outcomes = await self.database.run_core(partial(self._write, rows=rows))
            except Unavailable as failure:  # SQL down or locked: every caller answers so
                log.warning("journal write of %d decisions failed: %s", len(batch), failure)
                _answer(futures, [failure] * len(batch))
                continue
            except Exception:  # a row SQL refuses: find it, so it cannot fail the others
                log.exception("journal batch of %d refused; writing it row by row", len(batch))
                outcomes = await self._write_each(rows)
            else:
                self.observe(len(rows), time.perf_counter() - started)
            _answer(futures, outcomes)

    async def _write_each(self, rows: list[dict[str, Any]]) -> list[Written | BaseException]:
        outcomes: list[Written | BaseException] = []
        for row in rows:
            try:
                outcomes.extend(await self.database.run_core(partial(self._write, rows=[row])))
            except Exception as error:
                metrics.journal_rejected.inc()
                log.exception("journal: decision %s refused by SQL", row["authorization_id"])
                outcomes.append(error)
        return outcomes

    def _write(
        self, connection: Connection, *, rows: list[dict[str, Any]]
    ) -> list[Written | BaseException]:
        # One transaction of Database.run_core (SQLite: BEGIN IMMEDIATE), committed or rolled
        # back as a whole.
        stale = self._of_a_past_generation(connection, rows)
        kept = [row for row, refused in zip(rows, stale, strict=True) if not refused]
        inserted = self._insert.run(connection, _tuples(kept)) if kept else 0
        # Every row inserted (the usual case): none was a replay or a key answered before, and
        # the look-up of conflicts is skipped.
        all_new = inserted == len(kept)
        written = iter([None] * len(kept) if all_new else _conflicts(connection, kept))
        return [
            GenerationChanged("the hot state was lost or is being rebuilt; retry")
            if refused
            else next(written)
            for refused in stale
        ]

    def _of_a_past_generation(
        self, connection: Connection, rows: list[dict[str, Any]]
    ) -> list[bool]:
        """Which rows were decided in a generation no longer published (read under the
        journal's fence, in this transaction)."""
        if self.published_generation is None or not any(row.get("generation") for row in rows):
            return [False] * len(rows)
        for_journaling(connection)
        assert self.loop is not None
        try:
            published: str | None = asyncio.run_coroutine_threadsafe(
                self.published_generation(), self.loop
            ).result()
        except Exception as error:  # Redis does not answer: nothing is written, retry
            raise Unavailable(f"the hot state's generation cannot be read: {error}") from error
        return [bool(row.get("generation")) and row["generation"] != published for row in rows]

    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            try:
                async with self.flushing:
                    await self.flush()
            except Exception:
                log.exception("journal flush failed")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Takes no more rows (a write answers UNAVAILABLE), lets the background task answer
        the batches it is committing (at most what was queued: MAX_QUEUED), stops it, then
        writes what is left. Application.stop bounds the wait; given up, the task is cancelled
        all the same."""
        self.stopping = True
        if self.task is not None:
            await stop_between_flushes(self.task, self.flushing)
        try:
            await self.flush()
        except Exception:
            log.exception("journal: %d decisions not written at shutdown", len(self.queue))


def _conflicts(connection: Connection, rows: list[dict[str, Any]]) -> list[Written]:
    """Which rows' keys SQL holds under another authorization id (read in the same
    transaction, after the insert: a row not there was kept out by the key's index)."""
    ids = [row["authorization_id"] for row in rows]
    present = set(
        connection.scalars(
            select(AuthorizationRow.authorization_id).where(
                AuthorizationRow.authorization_id.in_(ids)
            )
        )
    )
    outcomes: list[Written] = []
    for row in rows:
        if row["authorization_id"] in present:
            outcomes.append(None)
            continue
        stored = stored_decision(connection, row["merchant_id"], row["idempotency_key"])
        if stored is None:  # the key's index kept the row out: its holder must be there
            raise LookupError(f"journal row {row['authorization_id']} neither written nor held")
        outcomes.append(stored)
    return outcomes


def stored_decision(
    connection: Connection | Session, merchant_id: str, idempotency_key: str
) -> StoredDecision | None:
    """The decision SQL holds for a merchant's idempotency key, None when it has none."""
    stored = connection.execute(
        select(
            AuthorizationRow.authorization_id,
            AuthorizationRow.request_digest,
            AuthorizationRow.response,
        ).where(
            AuthorizationRow.merchant_id == merchant_id,
            AuthorizationRow.idempotency_key == idempotency_key,
        )
    ).one_or_none()
    return None if stored is None else StoredDecision(stored[0], stored[1], bytes(stored[2]))


def _answer(
    futures: list[asyncio.Future[Written]], outcomes: Sequence[Written | BaseException]
) -> None:
    for future, outcome in zip(futures, outcomes, strict=True):
        settle(future, outcome)


async def stop_between_flushes(task: asyncio.Task[None], flushing: asyncio.Lock) -> None:
    """Cancels a writer's background task once it is between flushes (`flushing`, held by the
    task while it flushes, is free), never inside a commit, whose batch would otherwise commit
    on in the SQL thread unanswered or be written again by the last flush. A stop given up
    while it waits (Application.stop's bound) cancels the task all the same."""
    try:
        async with flushing:
            task.cancel()
    finally:
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def settle(future: asyncio.Future[Any], outcome: Any) -> None:
    """An outcome (an error: raised to the caller) to a caller still waiting."""
    if future.done():  # the caller stopped waiting (its deadline)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
