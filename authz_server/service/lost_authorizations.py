"""An authorization Redis does not know (lost with it, or dropped by retention once settled), as
SQL says: the one rule GetAuthorization, Capture and Void answer such an authorization by.

Captured when SQL has its capture; declined when it was; voided when its hold was voided or,
lost with Redis, no longer counts (a rebuild did not put it back: SQL counts it as released);
expired when its time passed with no void. But within STALE_CAPTURE_SECONDS after its time a
capture claimed before it (in a Redis since lost) may still commit: a capture is claimed before
the hold's time and written within CAPTURE_WRITE_DEADLINE_SECONDS of its claim, and the sweeper's
bound (30 s) leaves the rest for the commit itself and for the clocks of different servers. Get
shows it pending meanwhile (as a put-back hold shows in Redis); a capture or void is answered
UNAVAILABLE (retry), not AUTHORIZATION_EXPIRED, which would tell the till nothing was taken for
money that then is.
"""

from __future__ import annotations

import enum
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from authz_server.domain.types import AuthorizationStatus, Decision
from authz_server.service.ports import STALE_CAPTURE_SECONDS
from authz_server.storage.sql import records
from authz_server.storage.sql.tables import AuthorizationRow, CaptureRow


class LostState(enum.Enum):
    CAPTURED = "CAPTURED"
    DECLINED = "DECLINED"
    EXPIRED = "EXPIRED"
    CAPTURE_MAY_COMMIT = "CAPTURE_MAY_COMMIT"  # expired, but a capture may still commit
    VOIDED = "VOIDED"


# What a capture or void of such an authorization is refused with, and the status
# GetAuthorization shows. A capture that may still commit is answered UNAVAILABLE (retry), and
# shown pending meanwhile.
LOST_REFUSALS = {
    LostState.CAPTURED: "ALREADY_CAPTURED",
    LostState.DECLINED: "AUTHORIZATION_DECLINED",
    LostState.EXPIRED: "AUTHORIZATION_EXPIRED",
    LostState.VOIDED: "ALREADY_VOIDED",
}
LOST_STATUSES = {
    LostState.CAPTURED: AuthorizationStatus.CAPTURED,
    LostState.DECLINED: AuthorizationStatus.DECLINED,
    LostState.EXPIRED: AuthorizationStatus.EXPIRED,
    LostState.CAPTURE_MAY_COMMIT: AuthorizationStatus.PENDING,
    LostState.VOIDED: AuthorizationStatus.VOIDED,
}


def lost_state(journal_row: AuthorizationRow, captured: bool, now: datetime) -> LostState:
    """The rule (module docstring)."""
    if captured:
        return LostState.CAPTURED
    if journal_row.decision == Decision.DECLINED.value:
        return LostState.DECLINED
    if journal_row.voided_at is not None or journal_row.expires_at is None:
        return LostState.VOIDED
    expires_at = records.utc(journal_row.expires_at)
    if now < expires_at:
        return LostState.VOIDED
    if now < expires_at + timedelta(seconds=STALE_CAPTURE_SECONDS):
        return LostState.CAPTURE_MAY_COMMIT
    return LostState.EXPIRED


def read_lost_state(
    session: Session, authorization_id: str, now: datetime
) -> tuple[str, LostState] | None:
    """(its merchant, lost_state) as SQL has it; None when SQL does not know it either."""
    journal_row = session.get(AuthorizationRow, authorization_id)
    if journal_row is None:
        return None
    captured = session.get(CaptureRow, authorization_id) is not None
    return journal_row.merchant_id, lost_state(journal_row, captured, now)
