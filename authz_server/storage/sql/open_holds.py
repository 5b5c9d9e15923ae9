"""The holds SQL says are open (domain/hot_state.py's rule), read for a rebuild of the hot state
and for putting one hold back; and the mark a void leaves."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from authz_server.domain.funding import Funding, format_funding, parse_funding
from authz_server.domain.hot_state import APPROVALS, OpenHold, is_open
from authz_server.domain.types import RelationshipStatus
from authz_server.storage.sql.records import utc
from authz_server.storage.sql.tables import (
    AuthorizationRow,
    CapturePartRow,
    CaptureRow,
    RelationshipRow,
)

# What an open hold needs of its row (columns: no ORM object built for each).
HOLD_COLUMNS = (
    AuthorizationRow.authorization_id,
    AuthorizationRow.merchant_id,
    AuthorizationRow.beneficiary_id,
    AuthorizationRow.purpose,
    AuthorizationRow.decision,
    AuthorizationRow.approved_fen,
    AuthorizationRow.funding,
    AuthorizationRow.created_at,
    AuthorizationRow.expires_at,
)


def open_holds(
    session: Session,
    now: datetime,
    *,
    beneficiary_ids: Sequence[str] = (),
    beneficiaries: tuple[str, str] | None = None,
    authorization_id: str | None = None,
    known_active: Mapping[str, bool] | None = None,
) -> list[OpenHold]:
    """The open holds of these beneficiaries (`beneficiary_ids`, or those after beneficiaries[0]
    up to beneficiaries[1]: a rebuild's page) or of the one authorization, as SQL has them now.
    Read under the caller's row locks of their relationships, when it needs a stable answer.
    `known_active`: whether each relationship is active, as the caller read it under those
    locks (the rest are read here)."""
    query = select(*HOLD_COLUMNS).where(
        AuthorizationRow.decision.in_(sorted(APPROVALS)),
        AuthorizationRow.expires_at > now,
        AuthorizationRow.voided_at.is_(None),
        ~exists().where(CaptureRow.authorization_id == AuthorizationRow.authorization_id),
    )
    if authorization_id is not None:
        query = query.where(AuthorizationRow.authorization_id == authorization_id)
    elif beneficiaries is not None:
        after, last = beneficiaries
        query = query.where(
            AuthorizationRow.beneficiary_id > after, AuthorizationRow.beneficiary_id <= last
        )
    else:
        query = query.where(AuthorizationRow.beneficiary_id.in_(beneficiary_ids))
    rows = session.execute(query).all()
    funding = {row.authorization_id: parse_funding(row.funding) for row in rows}
    known = known_active or {}
    active = {rid for rid, is_active in known.items() if is_active}
    unknown = sorted({rid for parts in funding.values() for rid, _ in parts} - known.keys())
    if unknown:
        active.update(
            session.scalars(
                select(RelationshipRow.relationship_id).where(
                    RelationshipRow.relationship_id.in_(unknown),
                    RelationshipRow.status == RelationshipStatus.ACTIVE.value,
                )
            )
        )
    holds = []
    for row in rows:
        parts = funding[row.authorization_id]
        expires_at = utc(row.expires_at) if row.expires_at else None
        if expires_at is None or not is_open(
            row.decision,
            expires_at,
            voided=False,
            captured=False,
            funding_active=bool(parts) and all(rid in active for rid, _ in parts),
            now=now,
        ):
            continue
        holds.append(hold_of(row, parts))
    return holds


def hold_of(row: Any, funding: Funding | None = None) -> OpenHold:
    """A row of HOLD_COLUMNS as a hold (`funding`: its parsed funding, when read already)."""
    return OpenHold(
        authorization_id=row.authorization_id,
        merchant_id=row.merchant_id,
        beneficiary_id=row.beneficiary_id,
        purpose=row.purpose,
        decision=row.decision,
        approved_fen=row.approved_fen,
        funding=parse_funding(row.funding) if funding is None else funding,
        created_at=utc(row.created_at),
        expires_at=utc(row.expires_at),
    )


def ledger_parts(session: Session, authorization_id: str) -> str | None:
    """The captured parts ("rid=fen;..." in funding order), None when SQL has no capture."""
    return ledger_parts_of(session, [authorization_id]).get(authorization_id)


def ledger_parts_of(session: Session, authorization_ids: Sequence[str]) -> dict[str, str]:
    """ledger_parts of each of these authorizations SQL has a capture of (two queries)."""
    captured = set(
        session.scalars(
            select(CaptureRow.authorization_id).where(
                CaptureRow.authorization_id.in_(sorted(set(authorization_ids)))
            )
        )
    )
    parts: dict[str, list[tuple[str, int]]] = {
        authorization_id: [] for authorization_id in captured
    }
    if captured:
        for row in session.scalars(
            select(CapturePartRow)
            .where(CapturePartRow.authorization_id.in_(sorted(captured)))
            .order_by(CapturePartRow.authorization_id, CapturePartRow.position)
        ):
            parts[row.authorization_id].append((row.relationship_id, row.amount_fen))
    return {authorization_id: format_funding(drawn) for authorization_id, drawn in parts.items()}


class LedgerVoid(enum.Enum):
    """What SQL says of a void, decided under the locks of the quotas funding the hold."""

    UNKNOWN = "UNKNOWN"  # no such authorization of this merchant
    DECLINED = "DECLINED"
    CAPTURED = "CAPTURED"  # its capture committed first: it cannot be voided
    EXPIRED = "EXPIRED"  # left to Redis's own answer (expiry is Redis's to apply)
    VOIDED = "VOIDED"  # marked now, or before


def void_in_ledger(
    session: Session, authorization_id: str, merchant_id: str, now: datetime
) -> tuple[LedgerVoid, str]:
    """Marks a hold voided in SQL first, under its quotas' row locks (in id order, as every
    writer takes them): a capture committing at the same moment either committed before (then
    CAPTURED, with its parts "rid=fen;...") or will find the mark and be refused (the capture
    writer refuses a voided authorization). So a till is never told VOIDED for money SQL
    captured, even when Redis lost the capture's claim."""
    row = session.get(AuthorizationRow, authorization_id)
    if row is None or row.merchant_id != merchant_id:
        return LedgerVoid.UNKNOWN, ""
    if row.decision not in APPROVALS:
        return LedgerVoid.DECLINED, ""
    for relationship_id in sorted({rid for rid, _ in parse_funding(row.funding)}):
        session.execute(
            select(RelationshipRow.relationship_id)
            .where(RelationshipRow.relationship_id == relationship_id)
            .with_for_update()
        )
    parts = ledger_parts(session, authorization_id)
    if parts is not None:
        return LedgerVoid.CAPTURED, parts
    if row.voided_at is None and row.expires_at is not None and utc(row.expires_at) <= now:
        return LedgerVoid.EXPIRED, ""
    mark_voided(session, authorization_id, now)
    return LedgerVoid.VOIDED, ""


def mark_voided(session: Session, authorization_id: str, now: datetime) -> None:
    """A voided hold is voided in SQL too, so a rebuild does not put it back (a Void takes the
    quotas' locks first: void_in_ledger; a refused capture had nothing written)."""
    session.execute(
        update(AuthorizationRow)
        .where(
            AuthorizationRow.authorization_id == authorization_id,
            AuthorizationRow.voided_at.is_(None),
        )
        .values(voided_at=now)
    )
