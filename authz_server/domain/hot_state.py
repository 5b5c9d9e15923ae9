"""What the hot state (Redis) must hold, as the ledger (SQL) says: the rules a rebuild of Redis
from SQL follows, and that tests compare Redis with. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from authz_server.domain.funding import Funding
from authz_server.domain.model import QuotaFigures
from authz_server.domain.types import Decision

APPROVALS = frozenset({Decision.APPROVED.value, Decision.PARTIALLY_APPROVED.value})


@dataclass(frozen=True)
class OpenHold:
    """An approved authorization whose money is still held: not captured, voided or expired."""

    authorization_id: str
    merchant_id: str
    beneficiary_id: str
    purpose: str
    decision: str
    approved_fen: int
    funding: Funding
    created_at: datetime
    expires_at: datetime


def is_open(
    decision: str,
    expires_at: datetime | None,
    voided: bool,
    captured: bool,
    funding_active: bool,
    now: datetime,
) -> bool:
    """A hold is open while approved, not captured, not voided, not expired, and while every
    quota funding it is active (dissolution voids the holds of its quota: their other parts
    went back to their own quotas)."""
    return (
        decision in APPROVALS
        and expires_at is not None
        and expires_at > now
        and not voided
        and not captured
        and funding_active
    )


def held_by_quota(holds: Iterable[OpenHold]) -> dict[str, int]:
    """Money held on each quota (relationship id -> fen) by the open holds."""
    held: dict[str, int] = {}
    for hold in holds:
        for relationship_id, fen in hold.funding:
            held[relationship_id] = held.get(relationship_id, 0) + fen
    return held


def figures(unused_fen: int, held_fen: int) -> QuotaFigures:
    """An active quota's figures: what is unused in the ledger, less what open holds take."""
    return QuotaFigures(available_fen=unused_fen - held_fen, held_fen=held_fen)


def expected_figures(
    unused_by_quota: Mapping[str, int], holds: Iterable[OpenHold]
) -> dict[str, QuotaFigures]:
    """Every active quota's figures as the ledger says (relationship id -> figures)."""
    held = held_by_quota(holds)
    return {
        relationship_id: figures(unused, held.get(relationship_id, 0))
        for relationship_id, unused in unused_by_quota.items()
    }
