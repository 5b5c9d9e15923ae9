"""The small interfaces the services depend on (implemented in authz_server/storage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from authz_server.domain.model import QuotaFigures

__all__ = ["Debit", "QuotaCache", "QuotaFigures", "QuotaRestore"]


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
    # The relationship's newest ledger entry when SQL was read: credits up to it are counted in
    # unused_fen already, and are not added again when their Redis step comes late.
    ledger_mark: int


@dataclass(frozen=True)
class Debit:
    """Money taken from a quota's available figure."""

    available_fen: int  # what is left
    # The quota's restore epoch when taken: a give-back is skipped if a restore came since
    # (the restore set the figure from SQL, which never had the debit).
    epoch: str


class QuotaCache(Protocol):
    """Quota balances and holds in Redis; every change is one atomic Lua script."""

    async def credit(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int, entry_id: int
    ) -> bool:
        """Adds a credit SQL committed (ledger entry `entry_id`) to available, unless a restore
        counted it already. False when the quota is not there or not active (nothing done)."""
        ...

    async def give_back(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int, epoch: str
    ) -> None:
        """Returns a debit SQL did not commit, unless a restore came since it was taken."""
        ...

    async def debit(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int
    ) -> Debit | None:
        """Takes from available if it suffices; None if short (nothing done)."""
        ...

    async def dissolve(self, beneficiary_id: str, relationship_id: str) -> None:
        """Marks the quota dissolved, voiding its holds; later credits are refused."""
        ...

    async def restore(self, quota: QuotaRestore) -> QuotaFigures | None:
        """Sets a quota from the ledger's figure, keeping its open holds; the caller holds the
        relationship's row lock since it read the figure. None (nothing done) while a capture
        of the quota is between its phases."""
        ...

    async def figures(
        self, beneficiary_id: str, relationship_ids: list[str]
    ) -> dict[str, QuotaFigures]:
        """The live figures of the given quotas; a quota not in the cache is left out."""
        ...
