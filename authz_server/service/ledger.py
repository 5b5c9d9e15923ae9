"""The money movements of the registry and relationship services, each with its ledger row.

Every function here changes money in SQL and writes the ledger row explaining it, in the
caller's transaction. Nothing else in the code changes balance_fen or the quota totals.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from authz_server.domain import relationships as rules
from authz_server.domain.model import Participant
from authz_server.domain.types import (
    Channel,
    DissolutionReason,
    LedgerKind,
    Party,
    RelationshipStatus,
)
from authz_server.storage.sql import records
from authz_server.storage.sql.tables import (
    LedgerEntryRow,
    ParticipantRow,
    RelationshipEventRow,
    RelationshipRow,
)

SYSTEM_CHANNEL = "SYSTEM"


def entry(
    session: Session,
    kind: LedgerKind,
    holder_id: str,
    amount_fen: int,
    now: datetime,
    *,
    relationship_id: str | None = None,
    channel: Channel | None = None,
) -> LedgerEntryRow:
    row = LedgerEntryRow(
        kind=kind.value,
        holder_id=holder_id,
        relationship_id=relationship_id,
        amount_fen=amount_fen,
        channel=channel.value if channel else None,
        created_at=now,
    )
    session.add(row)
    return row


def event(
    session: Session,
    relationship_id: str,
    name: str,
    now: datetime,
    channel: Channel | None,
    party: Party | None = None,
) -> None:
    session.add(
        RelationshipEventRow(
            relationship_id=relationship_id,
            event=name,
            party=party.value if party else None,
            channel=channel.value if channel else SYSTEM_CHANNEL,
            created_at=now,
        )
    )


def credit_account(session: Session, holder_id: str, amount_fen: int) -> None:
    session.execute(
        update(ParticipantRow)
        .where(ParticipantRow.participant_id == holder_id)
        .values(balance_fen=ParticipantRow.balance_fen + amount_fen)
    )


def debit_account(session: Session, holder_id: str, amount_fen: int) -> Participant:
    """Debits the holder's account if the balance suffices (rule 5); the row is locked first, so
    concurrent allocations cannot overdraw it. Returns the holder after the debit."""
    row = records.participant_row(session, holder_id, lock=True)
    holder = records.participant(row)
    rules.check_balance(holder, amount_fen)
    row.balance_fen -= amount_fen
    return records.participant(row)


def dissolve(
    session: Session,
    row: RelationshipRow,
    reason: DissolutionReason,
    now: datetime,
    channel: Channel | None,
    party: Party | None = None,
) -> int:
    """Dissolves an open relationship and returns its unused quota (available + held) to the
    holder's personal account. Open holds are thereby voided: a later capture finds the
    relationship not active. Returns the amount returned."""
    unused = records.totals(row).unused_fen
    row.status = RelationshipStatus.DISSOLVED.value
    row.dissolved_at = now
    row.dissolution_reason = reason.value
    if unused:
        row.released_total_fen += unused
        credit_account(session, row.holder_id, unused)
        entry(
            session,
            LedgerKind.DISSOLUTION_RETURN,
            row.holder_id,
            unused,
            now,
            relationship_id=row.relationship_id,
            channel=channel,
        )
    # One DISSOLVED event; the reason is the row's dissolution_reason (a relationship is
    # dissolved once). "DISSOLVED_<reason>" overflowed the 32-character event column.
    event(session, row.relationship_id, "DISSOLVED", now, channel, party)
    return unused
