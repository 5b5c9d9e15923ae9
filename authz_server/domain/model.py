"""Plain records the rules reason about. The storage adapters build them; rules never do I/O."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from authz_server.domain.types import (
    Channel,
    DissolutionReason,
    ItemCategory,
    MerchantKind,
    ParticipantStatus,
    Relation,
    RelationshipStatus,
    Scheme,
)


@dataclass(frozen=True)
class Participant:
    participant_id: str
    scheme: Scheme
    pooling_region: str
    status: ParticipantStatus
    balance_fen: int
    updated_at: datetime

    @property
    def province(self) -> str:
        return self.pooling_region[:2]


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    kind: MerchantKind
    pooling_region: str
    designated: bool
    name: str


@dataclass(frozen=True)
class CatalogItem:
    item_code: str
    name: str
    category: ItemCategory
    eligible: bool


@dataclass(frozen=True)
class QuotaTotals:
    """A relationship's money, as the ledger (SQL) knows it: running totals, never decreasing.

    The conservation rule, written once (see `unused_fen`):
        allocated = available + held + captured - refunded_to_quota + released
    SQL does not know holds, so what it can state is unused = available + held.
    """

    allocated_total_fen: int
    released_total_fen: int
    captured_total_fen: int
    refunded_to_quota_total_fen: int

    @property
    def unused_fen(self) -> int:
        """available + held: what a dissolution returns and what reconcile gives Redis."""
        return (
            self.allocated_total_fen
            - self.released_total_fen
            - self.captured_total_fen
            + self.refunded_to_quota_total_fen
        )

    @property
    def within_ledger_limit(self) -> bool:
        """The ledger's limit (the CHECK constraints on `relationships` state it too): money
        out of a quota never exceeds money into it, captured - refunded_to_quota + released
        <= allocated, i.e. unused >= 0; every total is non-negative and a quota gets back no
        more than was captured from it."""
        return (
            self.unused_fen >= 0
            and min(
                self.allocated_total_fen,
                self.released_total_fen,
                self.captured_total_fen,
                self.refunded_to_quota_total_fen,
            )
            >= 0
            and self.refunded_to_quota_total_fen <= self.captured_total_fen
        )

    @property
    def allocated_now_fen(self) -> int:
        """Allocated minus given back to the holder; = available + held + spent."""
        return self.allocated_total_fen - self.released_total_fen

    @property
    def spent_fen(self) -> int:
        return self.captured_total_fen - self.refunded_to_quota_total_fen


@dataclass(frozen=True)
class Relationship:
    relationship_id: str
    holder_id: str
    beneficiary_id: str
    relation: Relation
    status: RelationshipStatus
    holder_consented: bool
    beneficiary_consented: bool
    created_channel: Channel
    created_at: datetime
    activated_at: datetime | None
    dissolved_at: datetime | None
    dissolution_reason: DissolutionReason | None
    totals: QuotaTotals


@dataclass(frozen=True)
class QuotaView:
    """A relationship with its live figures: `held_fen` comes from the hot state (Redis)."""

    relationship: Relationship
    available_fen: int
    held_fen: int

    @property
    def figures(self) -> QuotaFigures:
        return QuotaFigures(self.available_fen, self.held_fen)

    @staticmethod
    def shown(relationship: Relationship, available_fen: int, held_fen: int) -> QuotaView:
        """The view of hot figures as a holder or beneficiary reads them. Holds worth more than
        the quota's unused money (a hold put back on money approved twice after Redis served an
        older copy) leave available below zero until they are released: shown as nothing free
        and all of the unused money held, so that allocated = available + held + spent still
        reads true and no figure is below zero (Authorize's remaining figure says the same)."""
        if available_fen >= 0:
            return QuotaView(relationship, available_fen, held_fen)
        return QuotaView(relationship, 0, max(0, available_fen + held_fen))


@dataclass(frozen=True)
class QuotaFigures:
    """The hot figures of one quota: what can be authorized now and what holds reserve."""

    available_fen: int
    held_fen: int
