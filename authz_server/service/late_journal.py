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
from dataclasses import dataclass
from functools import partial
from typing import Any

from authz_server.domain.errors import Unavailable
from authz_server.observability import metrics
from authz_server.service.journal import DecisionJournal, GenerationChanged, StoredDecision

log = logging.getLogger(__name__)
# How long a row is submitted again (an outage longer than this leaves its hold to the till's
# retry, the release of abandoned holds, which waits longer than this: domain/abandoned_holds.py,
# or its expiry), the first wait and the longest between tries, and the most rows being retried
# at once per process (each one task; during a long outage every refused call hands one).
RETRY_SECONDS = 60.0
FIRST_WAIT_SECONDS = 0.2
LONGEST_WAIT_SECONDS = 5.0
MAX_ROWS = 1_000
# The last try each waiting row gets when the server stops (together, within its stop step).
STOP_TRY_SECONDS = 2.0

# Undoes the decision in Redis (when SQL holds another decision for its key).
Undo = Callable[[], Awaitable[None]]


@dataclass
class _Waiting:
    row: dict[str, Any]
    undo: Undo | None
    task: asyncio.Task[None] | None = None


class LateJournal:
    def __init__(self, journal: DecisionJournal) -> None:
        self.journal = journal
        # by authorization id: a till retrying with its key hands the same row again
        self._rows: dict[str, _Waiting] = {}
        self._stopped = False

    def hand(self, row: dict[str, Any], undo: Undo | None) -> None:
        """Submits `row` again in the background until the journal takes it; `undo` (None: a
        payment made, never undone) when SQL holds another decision for its key. A row of an
        authorization already waiting is not handed twice."""
        authorization_id = str(row["authorization_id"])
        if authorization_id in self._rows:
            return
        if self._stopped:
            self._count("abandoned", authorization_id, "the server is stopping")
            return
        if len(self._rows) >= MAX_ROWS:
            self._count("not_started", authorization_id, "too many rows waiting already")
            return
        waiting = _Waiting(row, undo)
        self._rows[authorization_id] = waiting
        waiting.task = asyncio.ensure_future(self._until_taken(waiting))
        waiting.task.add_done_callback(partial(self._ended, authorization_id))

    @property
    def waiting(self) -> int:
        """Rows being submitted again now."""
        return len(self._rows)

    def _ended(self, authorization_id: str, task: asyncio.Task[None]) -> None:
        self._rows.pop(authorization_id, None)
        if not task.cancelled() and task.exception() is not None:
            metrics.late_journal.labels("failed").inc()
            log.error(
                "authorization %s: the late journal failed; its hold stays in Redis only until "
                "the till retries with its key, it is released as abandoned, or it expires",
                authorization_id,
                exc_info=task.exception(),
            )  # fmt: skip

    async def stop(self) -> None:
        """The server stops (run before the journal's own stop): the rows still waiting get one
        last try each, within STOP_TRY_SECONDS; those it does not take are given up on, each
        logged and counted. Rows handed after this are given up on at once."""
        self._stopped = True
        waiting = list(self._rows.items())
        for _, each in waiting:
            if each.task is not None:
                each.task.cancel()
        await asyncio.gather(
            *(self._last_try(authorization_id, each) for authorization_id, each in waiting)
        )

    async def _last_try(self, authorization_id: str, waiting: _Waiting) -> None:
        if waiting.task is not None:
            await asyncio.wait([waiting.task])
            if not waiting.task.cancelled():  # it ended by itself before the cancel came
                return
        try:
            stored = await asyncio.wait_for(self.journal.write(waiting.row), STOP_TRY_SECONDS)
        except GenerationChanged:
            metrics.late_journal.labels("generation_changed").inc()
            return
        except (Unavailable, TimeoutError):
            self._count("abandoned", authorization_id, "the server stopped")
            return
        await self._taken(authorization_id, waiting, stored)

    async def _until_taken(self, waiting: _Waiting) -> None:
        authorization_id = str(waiting.row["authorization_id"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_SECONDS
        wait = FIRST_WAIT_SECONDS
        while True:
            await asyncio.sleep(min(wait, max(0.0, deadline - loop.time())))
            try:
                stored = await self.journal.write(waiting.row)
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
        await self._taken(authorization_id, waiting, stored)

    async def _taken(
        self, authorization_id: str, waiting: _Waiting, stored: StoredDecision | None
    ) -> None:
        if stored is None or stored.authorization_id == authorization_id:
            metrics.late_journal.labels("journaled").inc()
            return
        # SQL answered the key before, under another authorization (Redis had lost its record):
        # this decision is not the key's, and its hold goes, as a live call's would.
        if waiting.undo is None:
            metrics.late_journal.labels("other_decision").inc()
            log.error(
                "authorization %s: a payment made whose key SQL answered before under %s; the "
                "till was never told of it: see that it is refunded",
                authorization_id, stored.authorization_id,
            )  # fmt: skip
            return
        try:
            await waiting.undo()
        except Unavailable as error:
            self._count("undo_failed", authorization_id, str(error))
            return
        metrics.late_journal.labels("undone").inc()

    @staticmethod
    def _count(outcome: str, authorization_id: str, why: str) -> None:
        metrics.late_journal.labels(outcome).inc()
        log.warning(
            "authorization %s: its decision was not journaled (%s: %s); its hold stays in "
            "Redis only until the till retries with its key, it is released as abandoned "
            "(MEDWALLET_ABANDONED_HOLD_SECONDS), or it expires",
            authorization_id, outcome, why,
        )  # fmt: skip
