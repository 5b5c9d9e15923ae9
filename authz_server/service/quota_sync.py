"""Setting a hot quota in Redis from the ledger in SQL: one place for every caller.

The SQL figure is read under the relationship's row lock, and the Redis restore runs before that
lock is let go: every money movement of a quota takes that lock before it commits (captures,
refunds, allocations, releases, dissolution), and a release takes its money from Redis under
it. So nothing moves between the read and the restore; a credit committed before the read whose
Redis step comes after the restore is recognised by its ledger entry and not added twice
(quota_credit.lua). A restore whose command reaches Redis only after the lock was let go (its
reply timed out and the caller gave up, but the command was only late) changes nothing once the
quota's money moved since it read the quota's money version (quota_restore.lua). A restore may
run while servers serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, TypeVar

from redis.exceptions import ResponseError
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from authz_server.domain.errors import Unavailable
from authz_server.domain.model import QuotaFigures, QuotaTotals, Relationship
from authz_server.domain.types import RelationshipStatus, Scheme
from authz_server.service.ports import QuotaCache, QuotaRestore
from authz_server.storage.redis.generation import refused_slot
from authz_server.storage.redis.pipelined import UntrustedRedis
from authz_server.storage.sql import records
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import LedgerEntryRow, RelationshipRow

T = TypeVar("T")
log = logging.getLogger(__name__)
# How long a Redis step that follows a SQL commit waits for a rebuild of the hot state to end.
REBUILD_WAIT_SECONDS = 10.0
REBUILD_WAIT_STEP_SECONDS = 0.2


def restore_of(
    relationship: Relationship, beneficiary_scheme: Scheme, ledger_mark: int
) -> QuotaRestore:
    """What the ledger says the hot quota of a relationship should be."""
    return quota_restore(
        relationship_id=relationship.relationship_id,
        beneficiary_id=relationship.beneficiary_id,
        holder_id=relationship.holder_id,
        active=relationship.status is RelationshipStatus.ACTIVE,
        totals=relationship.totals,
        activated_at=relationship.activated_at or relationship.created_at,
        beneficiary_scheme=beneficiary_scheme,
        ledger_mark=ledger_mark,
    )


def quota_restore(
    *,
    relationship_id: str,
    beneficiary_id: str,
    holder_id: str,
    active: bool,
    totals: QuotaTotals,
    activated_at: datetime,
    beneficiary_scheme: Scheme,
    ledger_mark: int,
) -> QuotaRestore:
    """restore_of from a relationship's columns (a rebuild reads 100,000s of them without
    building a Relationship each). `activated_at` is aware (records.utc)."""
    return QuotaRestore(
        relationship_id=relationship_id,
        beneficiary_id=beneficiary_id,
        holder_id=holder_id,
        active=active,
        unused_fen=totals.unused_fen,
        funding_order=int(activated_at.timestamp() * 1000),
        beneficiary_scheme=beneficiary_scheme.value,
        ledger_mark=ledger_mark,
    )


def ledger_marks(session: Session, relationship_ids: Sequence[str]) -> dict[str, int]:
    """Each relationship's newest ledger entry (a relationship with none is left out)."""
    if not relationship_ids:
        return {}
    rows = session.execute(
        select(LedgerEntryRow.relationship_id, func.max(LedgerEntryRow.entry_id))
        .where(LedgerEntryRow.relationship_id.in_(relationship_ids))
        .group_by(LedgerEntryRow.relationship_id)
    )
    return {str(relationship_id): int(mark) for relationship_id, mark in rows}


def ledger_marks_where(session: Session, relationships: ColumnElement[bool]) -> dict[str, int]:
    """ledger_marks of the relationships matching a condition on their rows (a rebuild's page of
    beneficiaries): one index look-up a relationship, ~6.7 ms a page of 1,000 on PostgreSQL
    against 11-17 ms for a GROUP BY over the page's ids or a join (loadtest/RESULTS.md, "The
    rebuild's pages in parallel"). Read after the rows' locks, in a statement of its own: a
    locked SELECT that waited for a row returns its newest version (PostgreSQL, READ COMMITTED)
    but works out its subqueries in the snapshot it began with, so a mark read beside the row
    could predate the totals it goes with (tests/test_rebuild_pages_in_flight.py)."""
    newest = (
        select(func.max(LedgerEntryRow.entry_id))
        .where(LedgerEntryRow.relationship_id == RelationshipRow.relationship_id)
        .scalar_subquery()
    )
    rows = session.execute(select(RelationshipRow.relationship_id, newest).where(relationships))
    return {str(relationship_id): int(mark) for relationship_id, mark in rows if mark is not None}


def on_loop(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a Redis call on the event loop from a SQL thread (inside its transaction, so under
    its locks), and waits for it."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result()


def locked_restore_of(session: Session, relationship_id: str) -> QuotaRestore:
    """What the ledger says the relationship's hot quota should be, its row locked (until the
    session's transaction ends: the restore must run before)."""
    row = records.relationship_row(session, relationship_id, lock=True)
    beneficiary = records.participant_row(session, row.beneficiary_id)
    mark = ledger_marks(session, [relationship_id]).get(relationship_id, 0)
    return restore_of(records.relationship(row), Scheme(beneficiary.scheme), mark)


async def restore_from_ledger(
    database: Database, quotas: QuotaCache, relationship_id: str
) -> QuotaFigures:
    """Sets the relationship's hot quota from its latest figures (when Redis lacked a quota
    that SQL has, e.g. after Redis lost its data, or a new one). Unavailable while a capture
    of the quota is between its phases, or when its money moved during the restore (retry)."""
    loop = asyncio.get_running_loop()

    def work(session: Session) -> QuotaFigures | None:
        return on_loop(loop, quotas.restore(locked_restore_of(session, relationship_id)))

    figures = await database.run(work)
    if figures is None:
        raise Unavailable("a payment of this quota is being written; retry")
    return figures


async def heal_from_ledger(database: Database, quotas: QuotaCache, relationship_id: str) -> None:
    """`restore_from_ledger` for a quota Redis may have wrong (a release the ledger refused,
    a credit lost after its commit), best effort: when it cannot be set now (a capture of it
    between its phases, Redis down), the rolling reconcile does it later."""
    try:
        await restore_from_ledger(database, quotas, relationship_id)
    except Exception:
        log.warning(
            "quota %s (Redis may have it wrong) could not be set from the ledger now",
            relationship_id,
            extra={"relationship_id": relationship_id},
            exc_info=True,
        )


async def credit_as_ledger_says(
    database: Database,
    quotas: QuotaCache,
    beneficiary_id: str,
    relationship_id: str,
    amount_fen: int,
    entry_id: int,
) -> None:
    """Sends Redis a credit SQL committed (waiting out a rebuild: when_rebuilt). Redis without
    the quota has it set from the ledger. A credit that failed (its answer lost: it may have
    run; Redis failing) has its quota set from the ledger too, best effort (the credit's entry
    mark counts it once), and the failure raised: left so, the quota stayed short until a retry
    or the rolling reconcile."""
    try:
        credited = await when_rebuilt(
            lambda: quotas.credit(beneficiary_id, relationship_id, amount_fen, entry_id)
        )
        if not credited:
            await restore_from_ledger(database, quotas, relationship_id)
    except Exception:
        await heal_from_ledger(database, quotas, relationship_id)
        raise


async def when_rebuilt(step: Callable[[], Awaitable[T]]) -> T:
    """A Redis step that must follow what SQL committed (a credit, a capture's finish): while a
    rebuild of the hot state runs, its slot is refused (UNAVAILABLE), and the step is tried
    again until the rebuild has published its generation (REBUILD_WAIT_SECONDS at most).
    Given up at once, its money would be missing from (a credit) or held on (a capture of a
    hold the rebuild put back) a quota the rebuild had already written from SQL."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REBUILD_WAIT_SECONDS
    while True:
        try:
            return await step()
        except Unavailable as error:
            cause = error.__cause__
            # A slot refused by a rebuild under way, or a Redis process the adopted generation
            # was not built on (the run gate: a failover or a restart, rebuilt by the guardian
            # now): both end when the guardian adopts the rebuilt generation.
            refused = isinstance(cause, UntrustedRedis) or (
                isinstance(cause, ResponseError) and refused_slot(cause)
            )
            if not refused or loop.time() > deadline:
                raise
            await asyncio.sleep(REBUILD_WAIT_STEP_SECONDS)
