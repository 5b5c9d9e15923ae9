"""Rebuilds the hot quotas in Redis from the ledger in SQL (run at start-up and by command)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.model import Relationship
from authz_server.domain.types import RelationshipStatus, Scheme
from authz_server.service.ports import QuotaCache
from authz_server.service.quota_sync import restore_of
from authz_server.storage.redis.hold_store import HoldStore
from authz_server.storage.sql import records
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import (
    CapturePartRow,
    CaptureRow,
    ParticipantRow,
    RelationshipRow,
)

BATCH_SIZE = 1000


@dataclass(frozen=True)
class ReconcileReport:
    quotas: int
    drifted: int
    drift_fen: int


async def settle_interrupted_captures(database: Database, holds: HoldStore) -> int:
    """A capture whose process stopped between its SQL write and its Redis finish is left
    CAPTURING: finish it as SQL says (captured, or back to pending). Returns how many."""
    settled = 0
    async for key in holds.client.scan_iter(match="mw:{b:*}:a:*", count=1000):
        authorization_id = (key.decode() if isinstance(key, bytes) else key).rsplit(":", 1)[1]
        fields = await holds.get(authorization_id)
        if fields.get("s") != "CAPTURING":
            continue

        def parts(session: Session, authorization_id: str = authorization_id) -> str | None:
            if session.get(CaptureRow, authorization_id) is None:
                return None
            rows = session.scalars(
                select(CapturePartRow).where(CapturePartRow.authorization_id == authorization_id)
            )
            return ";".join(f"{row.relationship_id}={row.amount_fen}" for row in rows)

        captured = await database.run(parts)
        if captured is None:
            await holds.capture_finish(authorization_id, "PENDING", "")
        else:
            await holds.capture_finish(authorization_id, "CAPTURED", captured)
        settled += 1
    return settled


async def reconcile(
    database: Database, quotas: QuotaCache, holds: HoldStore | None = None
) -> ReconcileReport:
    """Sets every active quota to the ledger's unused figure (keeping open holds) and marks
    every other relationship's quota dissolved. Counts quotas whose figure was different.

    Run it at start-up (the server does) or with traffic stopped: a capture between its two
    phases while this runs can leave a quota understated (never overstated) until the next run.
    """
    if holds is not None:
        await settle_interrupted_captures(database, holds)
    after = ""
    count = drifted = drift_fen = 0
    while True:
        cursor = after

        def page(session: Session, cursor: str = cursor) -> list[tuple[Relationship, Scheme]]:
            rows = session.execute(
                select(RelationshipRow, ParticipantRow.scheme)
                .join(
                    ParticipantRow, ParticipantRow.participant_id == RelationshipRow.beneficiary_id
                )
                .where(
                    RelationshipRow.relationship_id > cursor,
                    RelationshipRow.status == RelationshipStatus.ACTIVE.value,
                )
                .order_by(RelationshipRow.relationship_id)
                .limit(BATCH_SIZE)
            )
            return [(records.relationship(row), Scheme(scheme)) for row, scheme in rows]

        batch = await database.run(page)
        if not batch:
            break
        for relationship, scheme in batch:
            before = await quotas.figures(
                relationship.beneficiary_id, [relationship.relationship_id]
            )
            after_figures = await quotas.restore(restore_of(relationship, scheme))
            old = before.get(relationship.relationship_id)
            old_total = (old.available_fen + old.held_fen) if old else None
            new_total = after_figures.available_fen + after_figures.held_fen
            if old_total != new_total:
                drifted += 1
                drift_fen += abs(new_total - (old_total or 0))
            count += 1
        after = batch[-1][0].relationship_id
    return ReconcileReport(quotas=count, drifted=drifted, drift_fen=drift_fen)
