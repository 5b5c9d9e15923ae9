"""Conversions between rows and domain records, and the row look-ups the services share."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from authz_server.domain.errors import NotFound
from authz_server.domain.model import Participant, QuotaTotals, Relationship
from authz_server.domain.types import (
    Channel,
    DissolutionReason,
    LedgerKind,
    ParticipantStatus,
    Relation,
    RelationshipStatus,
    Scheme,
)
from authz_server.storage.sql.tables import (
    CapturePartRow,
    LedgerEntryRow,
    ParticipantRow,
    RelationshipRow,
)

T = TypeVar("T")


def utc(moment: datetime) -> datetime:
    """SQLite gives naive datetimes back; everything stored is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def participant(row: ParticipantRow) -> Participant:
    return Participant(
        participant_id=row.participant_id,
        scheme=Scheme(row.scheme),
        pooling_region=row.pooling_region,
        status=ParticipantStatus(row.status),
        balance_fen=row.balance_fen,
        updated_at=utc(row.updated_at),
    )


def totals(row: RelationshipRow) -> QuotaTotals:
    return QuotaTotals(
        allocated_total_fen=row.allocated_total_fen,
        released_total_fen=row.released_total_fen,
        captured_total_fen=row.captured_total_fen,
        refunded_to_quota_total_fen=row.refunded_to_quota_total_fen,
    )


def relationship(row: RelationshipRow) -> Relationship:
    return Relationship(
        relationship_id=row.relationship_id,
        holder_id=row.holder_id,
        beneficiary_id=row.beneficiary_id,
        relation=Relation(row.relation),
        status=RelationshipStatus(row.status),
        holder_consented=row.holder_consented,
        beneficiary_consented=row.beneficiary_consented,
        created_channel=Channel(row.created_channel),
        created_at=utc(row.created_at),
        activated_at=utc(row.activated_at) if row.activated_at else None,
        dissolved_at=utc(row.dissolved_at) if row.dissolved_at else None,
        dissolution_reason=(
            DissolutionReason(row.dissolution_reason) if row.dissolution_reason else None
        ),
        totals=totals(row),
    )


def locked(query: Select[T]) -> Select[T]:
    """`query` FOR UPDATE, its rows' objects refreshed from what it locked. The ORM leaves an
    object already in the session as it was loaded (populate_existing is not implied by the
    lock): a row loaded before, whose lock a rolled-back savepoint let go (a refused unit of a
    group commit), or loaded without one, would be decided on as it was then while PostgreSQL
    has a newer version committed since (READ COMMITTED). Unflushed changes are flushed first
    (autoflush), so refreshing loses none."""
    return query.with_for_update().execution_options(populate_existing=True)


def participant_row(session: Session, participant_id: str, *, lock: bool = False) -> ParticipantRow:
    query = select(ParticipantRow).where(ParticipantRow.participant_id == participant_id)
    row = session.scalars(locked(query) if lock else query).one_or_none()
    if row is None:
        raise NotFound(f"participant {participant_id} not found")
    return row


def relationship_row(
    session: Session, relationship_id: str, *, lock: bool = False
) -> RelationshipRow:
    query = select(RelationshipRow).where(RelationshipRow.relationship_id == relationship_id)
    row = session.scalars(locked(query) if lock else query).one_or_none()
    if row is None:
        raise NotFound(f"relationship {relationship_id} not found")
    return row


def captured_parts(session: Session, authorization_id: str) -> tuple[tuple[str, int], ...]:
    """What a capture drew, (relationship, fen) in funding order; () when not captured."""
    rows = session.scalars(
        select(CapturePartRow)
        .where(CapturePartRow.authorization_id == authorization_id)
        .order_by(CapturePartRow.position)
    )
    return tuple((row.relationship_id, row.amount_fen) for row in rows)


def capture_entries(session: Session, authorization_id: str) -> tuple[tuple[str, int], ...]:
    """A capture's CAPTURE ledger entries, (relationship, entry id), one per quota it drew from
    (storage/sql/capture_batch.py writes them with the capture): at most as many rows as the
    capture has parts, found by the entries' authorization index. () when not captured."""
    rows = session.execute(
        select(LedgerEntryRow.relationship_id, func.max(LedgerEntryRow.entry_id))
        .where(
            LedgerEntryRow.authorization_id == authorization_id,
            LedgerEntryRow.kind == LedgerKind.CAPTURE.value,
        )
        .group_by(LedgerEntryRow.relationship_id)
        .order_by(LedgerEntryRow.relationship_id)
    )
    return tuple(
        (str(relationship_id), int(entry_id))
        for relationship_id, entry_id in rows
        if relationship_id is not None
    )
