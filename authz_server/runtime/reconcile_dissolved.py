"""The rolling reconcile's second cursor: every dissolution SQL committed is made sure of in
Redis, once, in the order they were dissolved.

A dissolve commits in SQL first, then marks the quota dissolved in Redis (service/
relationships.py, service/registry.py). A server that dies between the two, or a Redis step
that failed and was never retried by its caller, leaves the quota active in Redis: Authorize
may place holds on money the ledger gave back to the holder (each capture of them is refused,
RELATIONSHIP_NOT_ACTIVE, but the till was told approved). The quota pages (runtime/reconcile.py)
visit active relationships only, so nothing else would mend it before a rebuild.

So each rolling turn also reads the next few relationships dissolved after the cursor
keys.RECONCILE_DISSOLVED_CURSOR (dissolved_at, then relationship id: the index
ix_relationships_dissolved_at), and runs the dissolve's Redis step (lua/quota_dissolve.lua,
idempotent) on any that Redis still has active, counting it as drift. Only dissolutions older
than SETTLED_AFTER_SECONDS are read: a dissolution's time is taken by its server's clock before
its transaction commits, so one committed later may carry an earlier time than one the cursor
has passed; waiting that long lets every such transaction commit first (and its own Redis step
finish) before the cursor passes its time. A rebuild of the hot state deletes the cursor
with the rest and sets it again at its own start (less that grace): every dissolution before
is in the rebuilt Redis as SQL says. A cursor missing all the same (an operator's DEL, the
first turn ever) starts at the first dissolution: a pass over the history at the page's pace,
each one a read of its quota in Redis.

What this does not cover: a dissolution whose transaction took longer than the grace from its
clock reading to its commit (nothing bounds a PostgreSQL transaction's time here: a row lock
waited on for minutes) and whose Redis step was lost as well; or server clocks apart by more
than the grace. Such a quota stays active in Redis until a rebuild (each capture on it is
refused by the ledger all the same).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from authz_server.domain.errors import Unavailable
from authz_server.domain.model import QuotaFigures
from authz_server.domain.types import RelationshipStatus
from authz_server.runtime.reconcile import ReconcileReport, drift_of
from authz_server.service.clock import Clock, system_clock
from authz_server.service.ports import QuotaCache
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.records import utc
from authz_server.storage.sql.tables import RelationshipRow

log = logging.getLogger(__name__)
# How old a dissolution must be before the cursor may pass it: longer than a dissolving
# transaction's time from its clock reading to its commit (milliseconds; seconds behind a busy
# row lock) plus the servers' clock skew (NTP keeps it well under a second), and longer than a
# dissolve's Redis step with its retries through a rebuild (REBUILD_WAIT_SECONDS). What it
# costs: a lost Redis step is mended this much later.
SETTLED_AFTER_SECONDS = 300.0
_SEPARATOR = "|"


@dataclass(frozen=True)
class Dissolution:
    relationship_id: str
    beneficiary_id: str
    dissolved_at: datetime

    @property
    def cursor(self) -> str:
        return _cursor(self.dissolved_at, self.relationship_id)


def _cursor(dissolved_at: datetime, relationship_id: str) -> str:
    """The stored form of a position; parse_cursor reads it back."""
    return f"{dissolved_at.isoformat()}{_SEPARATOR}{relationship_id}"


def dissolutions_cursor_at(moment: datetime) -> str:
    """A cursor before every dissolution made from SETTLED_AFTER_SECONDS before `moment` on
    (a rebuild's start: runtime/rebuild.py)."""
    return _cursor(moment - timedelta(seconds=SETTLED_AFTER_SECONDS), "")


def parse_cursor(cursor: str) -> tuple[datetime, str] | None:
    """(dissolved_at, relationship id) of a stored cursor; None for "" (from the first). A
    cursor that does not parse (an operator's stray SET) also starts from the first."""
    moment, separator, relationship_id = cursor.partition(_SEPARATOR)
    if not separator:
        return None
    try:
        return utc(datetime.fromisoformat(moment)), relationship_id
    except ValueError:
        log.warning("rolling reconcile: dissolution cursor %r unreadable; from the first", cursor)
        return None


def dissolutions_after(
    session: Session, after: str, page_size: int, settled_before: datetime
) -> list[Dissolution]:
    """Up to `page_size` relationships dissolved after the cursor `after` and before
    `settled_before`, in the cursor's order."""
    row = RelationshipRow
    query = select(row.relationship_id, row.beneficiary_id, row.dissolved_at).where(
        RelationshipRow.status == RelationshipStatus.DISSOLVED.value,
        RelationshipRow.dissolved_at.is_not(None),
        RelationshipRow.dissolved_at < settled_before,
    )
    position = parse_cursor(after)
    if position is not None:
        query = query.where(
            tuple_(RelationshipRow.dissolved_at, RelationshipRow.relationship_id) > position
        )
    rows = session.execute(
        query.order_by(RelationshipRow.dissolved_at, RelationshipRow.relationship_id).limit(
            page_size
        )
    )
    return [
        Dissolution(relationship_id, beneficiary_id, utc(dissolved_at))
        for relationship_id, beneficiary_id, dissolved_at in rows
        if dissolved_at is not None  # the query's own condition: for the type checker
    ]


async def reconcile_dissolved_page(
    database: Database,
    quotas: QuotaCache,
    after: str,
    page_size: int,
    clock: Clock = system_clock,
) -> tuple[str, ReconcileReport]:
    """The next page of dissolutions after the cursor `after`: each quota Redis still has active
    is dissolved there. Returns (the cursor to store: the last dissolution made sure of, `after`
    when none; what it found: `quotas` the dissolutions read, `drifted` those still active, by
    their figures in `drift_fen`, `failed` those a Redis call failed on and the rest after
    them, which the next turn reads again)."""
    settled_before = clock() - timedelta(seconds=SETTLED_AFTER_SECONDS)
    page = await database.run(
        lambda session: dissolutions_after(session, after, page_size, settled_before)
    )
    if not page:
        return after, ReconcileReport(quotas=0, drifted=0, drift_fen=0)
    cursor = after
    done = drifted = drift_fen = overstated = 0
    try:
        found = await asyncio.gather(
            *(quotas.still_active(d.beneficiary_id, [d.relationship_id]) for d in page)
        )
        for dissolution, active in zip(page, found, strict=True):
            figures = active.get(dissolution.relationship_id)
            if figures is not None:
                await quotas.dissolve(dissolution.beneficiary_id, dissolution.relationship_id)
                log.warning(
                    "rolling reconcile: relationship %s, dissolved at %s, was still active in "
                    "Redis (available %d, held %d fen); dissolved there",
                    dissolution.relationship_id, dissolution.dissolved_at.isoformat(),
                    figures.available_fen, figures.held_fen,
                )  # fmt: skip
                drifted += 1
                # Everything it had was money the ledger gave back to the holder: its sum, as
                # drift_of counts a quota against a ledger figure of nothing (available below
                # zero, holds over-committing it, is not more of it).
                drift = drift_of(figures, QuotaFigures(available_fen=0, held_fen=0))
                drift_fen += drift.fen if drift is not None else 0
                overstated += 1
            cursor = dissolution.cursor
            done += 1
    except Unavailable as error:
        log.warning(
            "rolling reconcile: a dissolution after %r not made sure of (%s); the next turn "
            "reads it again", cursor, error,
        )  # fmt: skip
    report = ReconcileReport(
        quotas=done,
        drifted=drifted,
        drift_fen=drift_fen,
        overstated=overstated,
        failed=len(page) - done,
    )
    return cursor, report
