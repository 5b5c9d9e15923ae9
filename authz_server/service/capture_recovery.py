"""Settling captures that stopped between their phases: finished as SQL, the record, says.

A capture claims its hold in Redis (CAPTURING), writes SQL, then finishes the hold. If the
process dies or loses the Redis reply in between, the hold stays CAPTURING: neither void nor
expiry may take it, because SQL may already count it captured. Here it is finished as SQL says:
CAPTURED with the parts SQL has, or back to PENDING when SQL has nothing (the merchant may retry).
Called at start-up (reconcile), by the sweeper for captures stalled past STALE_CAPTURE_SECONDS,
and by a same-key retry that finds its own capture stalled.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.funding import format_funding
from authz_server.storage.redis.hold_store import HoldStore
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import CapturePartRow, CaptureRow


def ledger_parts(session: Session, authorization_id: str) -> str | None:
    """The captured parts ("rid=fen;..." in funding order), None when SQL has no capture."""
    if session.get(CaptureRow, authorization_id) is None:
        return None
    rows = session.scalars(
        select(CapturePartRow)
        .where(CapturePartRow.authorization_id == authorization_id)
        .order_by(CapturePartRow.position)
    )
    return format_funding((row.relationship_id, row.amount_fen) for row in rows)


async def settle_capture(database: Database, holds: HoldStore, authorization_id: str) -> None:
    captured = await database.run(lambda session: ledger_parts(session, authorization_id))
    if captured is None:
        await holds.capture_finish(authorization_id, "PENDING", "")
    else:
        await holds.capture_finish(authorization_id, "CAPTURED", captured)


async def settle_stalled(
    database: Database, holds: HoldStore, now_ms: int, older_than_ms: int
) -> int:
    stalled = await holds.stalled_captures(now_ms, older_than_ms)
    for authorization_id in stalled:
        await settle_capture(database, holds, authorization_id)
    return len(stalled)
