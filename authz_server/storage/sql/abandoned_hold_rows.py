"""SQL's side of releasing abandoned holds (runtime/release_abandoned_holds.py says why): which
quotas a page covers, which holds the journal has, and a DECLINED row put under each abandoned
hold's idempotency key, SQL's unique (merchant, key) deciding whose decision the key keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table, select, tuple_
from sqlalchemy.orm import Session

from authz_server.domain.types import RelationshipStatus
from authz_server.storage.sql.dbapi import BulkInsert
from authz_server.storage.sql.tables import (
    DECISION_COLUMNS,
    AuthorizationRow,
    RelationshipRow,
)

AUTHORIZATIONS: Table = AuthorizationRow.__table__  # type: ignore[assignment]


def active_quotas_between(
    session: Session, after: str, through: str, limit: int
) -> list[tuple[str, str]]:
    """(beneficiary id, relationship id) of the active relationships whose ids come after
    `after`, up to `through` included (a rolling page's range), at most `limit`. Read without
    locks: the holds on them are what is looked at, and those live in Redis."""
    rows = session.execute(
        select(RelationshipRow.beneficiary_id, RelationshipRow.relationship_id)
        .where(
            RelationshipRow.relationship_id > after,
            RelationshipRow.relationship_id <= through,
            RelationshipRow.status == RelationshipStatus.ACTIVE.value,
        )
        .order_by(RelationshipRow.relationship_id)
        .limit(limit)
    )
    return [(beneficiary_id, relationship_id) for beneficiary_id, relationship_id in rows]


def journaled_ids(session: Session, authorization_ids: Sequence[str]) -> set[str]:
    """Those of the authorizations the journal has a row of (one query, by primary key)."""
    if not authorization_ids:
        return set()
    return set(
        session.scalars(
            select(AuthorizationRow.authorization_id).where(
                AuthorizationRow.authorization_id.in_(authorization_ids)
            )
        )
    )


def decline_in_their_place(
    connection: Connection, rows: Sequence[dict[str, Any]]
) -> dict[tuple[str, str], str]:
    """Inserts each DECLINED row (a dict of DECISION_COLUMNS, `response` serialized) unless its
    (merchant, idempotency key) has a row already (ON CONFLICT DO NOTHING: the key's decision
    was journaled meanwhile, by a retry or the late journal), then reads, in the same
    transaction, the authorization SQL holds for each key: by (merchant id, key). Run in one
    transaction (Database.run_core): whoever commits first under the unique index has the key."""
    if not rows:
        return {}
    insert = BulkInsert.of(
        AUTHORIZATIONS, connection.dialect, DECISION_COLUMNS, skip_conflicts=True
    )
    insert.run(connection, [[row[name] for name in DECISION_COLUMNS] for row in rows])
    wanted = [(row["merchant_id"], row["idempotency_key"]) for row in rows]
    found = connection.execute(
        select(
            AuthorizationRow.merchant_id,
            AuthorizationRow.idempotency_key,
            AuthorizationRow.authorization_id,
        ).where(tuple_(AuthorizationRow.merchant_id, AuthorizationRow.idempotency_key).in_(wanted))
    )
    return {(merchant, key): authorization_id for merchant, key, authorization_id in found}
