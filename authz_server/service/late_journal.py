"""Decision rows the journal did not take when their Authorize wrote them, written later.

An Authorize's hold is in Redis before its row is journaled (service/authorization.py). When
the journal does not take the row (SQL down or locked, the hot state's generation unreadable,
the queue full), the call answers UNAVAILABLE at once, as before; but its hold would stay in
Redis only, holding the family's money until it expired with SQL knowing nothing, unless the
till retried with its key. So the same row is handed here and submitted again in the
background until the journal takes it: the same row, never a new decision (a row is kept once
whoever writes it first: the till's retry, this, or a first try whose commit went through
unanswered). Bounded: RETRY_SECONDS per row, MAX_ROWS rows at once; what is given up on is
logged by authorization id and counted (medwallet_authorize_late_journal_total).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from authz_server.domain.errors import Unavailable
from authz_server.observability import metrics
from authz_server.service.journal import DecisionJournal, GenerationChanged

log = logging.getLogger(__name__)
# How long a row is submitted again (an outage longer than this leaves its hold to the till's
# retry or its expiry), the first wait and the longest between tries, and the most rows being
# retried at once per process (each one task; during a long outage every refused call hands one).
RETRY_SECONDS = 60.0
FIRST_WAIT_SECONDS = 0.2
LONGEST_WAIT_SECONDS = 5.0
MAX_ROWS = 1_000

# Undoes the decision in Redis (when SQL holds another decision for its key).
Undo = Callable[[], Awaitable[None]]


class LateJournal:
    def __init__(self, journal: DecisionJournal) -> None:
        self.journal = journal
        self._rows: dict[asyncio.Task[None], str] = {}

    def hand(self, row: dict[str, Any], undo: Undo | None) -> None:
        """Submits `row` again in the background until the journal takes it; `undo` (None: a
        payment made, never undone) when SQL holds another decision for its key."""
        authorization_id = str(row["authorization_id"])
        if len(self._rows) >= MAX_ROWS:
            self._count("not_started", authorization_id, "too many rows waiting already")
            return
        task = asyncio.ensure_future(self._until_taken(row, undo))
        self._rows[task] = authorization_id
        task.add_done_callback(self._ended)

    @property
    def waiting(self) -> int:
        """Rows being submitted again now."""
        return len(self._rows)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._rows.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("late journal: a row's retry failed", exc_info=task.exception())

    async def stop(self) -> None:
        """Gives up on the rows still waiting (the server stops; run before the journal's own
        stop, which writes what is queued), each logged and counted."""
        waiting = list(self._rows.items())
        for task, _ in waiting:
            task.cancel()
        for task, authorization_id in waiting:
            try:
                await task
            except asyncio.CancelledError:
                self._count("abandoned", authorization_id, "the server stopped")

    async def _until_taken(self, row: dict[str, Any], undo: Undo | None) -> None:
        authorization_id = str(row["authorization_id"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_SECONDS
        wait = FIRST_WAIT_SECONDS
        while True:
            await asyncio.sleep(min(wait, max(0.0, deadline - loop.time())))
            try:
                stored = await self.journal.write(row)
            except GenerationChanged:  # Redis lost or rebuilt since: the rebuild dropped it
                metrics.late_journal.labels("generation_changed").inc()
                return
            except Unavailable as error:
                if loop.time() >= deadline:
                    self._count("gave_up", authorization_id, str(error))
                    return
                wait = min(wait * 2, LONGEST_WAIT_SECONDS)
                continue
            break
        if stored is None or stored.authorization_id == authorization_id:
            metrics.late_journal.labels("journaled").inc()
            return
        # SQL answered the key before, under another authorization (Redis had lost its record):
        # this decision is not the key's, and its hold goes, as a live call's would.
        if undo is None:
            self._count("other_decision", authorization_id, "a payment made; not undone")
            return
        try:
            await undo()
        except Unavailable as error:
            self._count("undo_failed", authorization_id, str(error))
            return
        metrics.late_journal.labels("undone").inc()

    @staticmethod
    def _count(outcome: str, authorization_id: str, why: str) -> None:
        metrics.late_journal.labels(outcome).inc()
        log.warning(
            "authorization %s: its decision was not journaled (%s: %s); its hold stays in "
            "Redis only until the till retries with its key or it expires",
            authorization_id, outcome, why,
        )  # fmt: skip
