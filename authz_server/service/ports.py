"""The small interfaces the services depend on (implemented in authz_server/storage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from authz_server.domain.model import QuotaFigures

__all__ = ["QuotaCache", "QuotaFigures", "QuotaRestore"]


@dataclass(frozen=True)
class QuotaRestore:
    """What the system of record says a quota should hold (for start-up and reconcile)."""

    relationship_id: str
    beneficiary_id: str
    holder_id: str
    active: bool
    unused_fen: int
    # Funding order: smaller is drawn first (the relationship's activation time in ms).
    funding_order: int
    # The beneficiary's scheme (the resident premium is only for residents). It cannot change
    # while the relationship is active: a change of scheme passes through termination.
    beneficiary_scheme: str


class QuotaCache(Protocol):
    """Quota balances and holds in Redis; every change is one atomic Lua script."""

    async def credit(self, beneficiary_id: str, relationship_id: str, amount_fen: int) -> bool:
        """Adds to available; False when the quota is not there or not active (nothing done)."""
        ...

    async def debit(self, beneficiary_id: str, relationship_id: str, amount_fen: int) -> int | None:
        """Takes from available if it suffices; returns the new available, None if short."""
        ...

    async def dissolve(self, beneficiary_id: str, relationship_id: str) -> None:
        """Marks the quota dissolved, voiding its holds; later credits are refused."""
        ...

    async def restore(self, quota: QuotaRestore) -> QuotaFigures:
        """Sets a quota from the ledger's figure, keeping its open holds."""
        ...

    async def figures(
        self, beneficiary_id: str, relationship_ids: list[str]
    ) -> dict[str, QuotaFigures]:
        """The live figures of the given quotas; a quota not in the cache is left out."""
        ...
