"""Setting a hot quota in Redis from the ledger in SQL: one place for every caller."""

from __future__ import annotations

from sqlalchemy.orm import Session

from authz_server.domain.model import QuotaFigures, Relationship
from authz_server.domain.types import RelationshipStatus, Scheme
from authz_server.service.ports import QuotaCache, QuotaRestore
from authz_server.storage.sql import records
from authz_server.storage.sql.database import Database


def restore_of(relationship: Relationship, beneficiary_scheme: Scheme) -> QuotaRestore:
    """What the ledger says the hot quota of a relationship should be."""
    activated = relationship.activated_at or relationship.created_at
    return QuotaRestore(
        relationship_id=relationship.relationship_id,
        beneficiary_id=relationship.beneficiary_id,
        holder_id=relationship.holder_id,
        active=relationship.status is RelationshipStatus.ACTIVE,
        unused_fen=relationship.totals.unused_fen,
        funding_order=int(activated.timestamp() * 1000),
        beneficiary_scheme=beneficiary_scheme.value,
    )


async def restore_from_ledger(
    database: Database, quotas: QuotaCache, relationship_id: str
) -> QuotaFigures:
    """Reads the relationship's latest figures and sets its hot quota from them (used when
    Redis lacked a quota that SQL has, e.g. after Redis lost its data)."""

    def read(session: Session) -> tuple[Relationship, Scheme]:
        row = records.relationship_row(session, relationship_id)
        beneficiary = records.participant_row(session, row.beneficiary_id)
        return records.relationship(row), Scheme(beneficiary.scheme)

    relationship, scheme = await database.run(read)
    return await quotas.restore(restore_of(relationship, scheme))
