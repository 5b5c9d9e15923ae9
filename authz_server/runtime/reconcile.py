"""Rebuilds the hot quotas in Redis from the ledger in SQL (run at start-up and by command)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.model import Relationship
from authz_server.domain.types import RelationshipStatus, Scheme
from authz_server.service.ports import QuotaCache
from authz_server.service.relationships import restore_of
from authz_server.storage.sql import records
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import ParticipantRow, RelationshipRow

BATCH_SIZE = 1000


@dataclass(frozen=True)
class ReconcileReport:
    quotas: int
    drifted: int
    drift_fen: int


async def reconcile(database: Database, quotas: QuotaCache) -> ReconcileReport:
    """Sets every active quota to the ledger's unused figure (keeping open holds) and marks
    every other relationship's quota dissolved. Counts quotas whose figure was different."""
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
