"""Tables of the system of record. Schema changes go through Alembic (authz_server/migrations)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The ledger's limit on a relationship's running totals (domain.model.QuotaTotals
# .within_ledger_limit), enforced by the database whatever the code does: money out of a quota
# never exceeds money into it. Names get the "ck_relationships_" prefix (NAMING); migration 0004
# adds them.
LEDGER_LIMIT_CHECKS = {
    "within_allocation": (
        "captured_total_fen - refunded_to_quota_total_fen + released_total_fen"
        " <= allocated_total_fen"
    ),
    "totals_not_negative": (
        "allocated_total_fen >= 0 AND released_total_fen >= 0 AND captured_total_fen >= 0"
        " AND refunded_to_quota_total_fen >= 0"
    ),
    "refunds_within_captures": "refunded_to_quota_total_fen <= captured_total_fen",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigIdentity = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


Id = String(64)
# A relationship's id sorts by code point on PostgreSQL whatever the database's collation
# (migration 0010): writers lock many quotas in id order, some through SQL's ORDER BY, some
# through Python's sorted(), and the two must agree. SQLite compares text by code point already.
RelationshipId = Id.with_variant(String(64, collation="C"), "postgresql")
Enum = String(32)
Timestamp = DateTime(timezone=True)


class ParticipantRow(Base):
    __tablename__ = "participants"

    participant_id: Mapped[str] = mapped_column(Id, primary_key=True)
    scheme: Mapped[str] = mapped_column(Enum)
    pooling_region: Mapped[str] = mapped_column(String(6))
    status: Mapped[str] = mapped_column(Enum)
    termination_reason: Mapped[str | None] = mapped_column(Enum)
    # The personal account (employees only). Changed only together with a ledger row.
    balance_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)


class MerchantRow(Base):
    __tablename__ = "merchants"

    merchant_id: Mapped[str] = mapped_column(Id, primary_key=True)
    kind: Mapped[str] = mapped_column(Enum)
    pooling_region: Mapped[str] = mapped_column(String(6))
    designated: Mapped[bool] = mapped_column(Boolean)
    name: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(Timestamp)


class CatalogItemRow(Base):
    __tablename__ = "catalog_items"

    item_code: Mapped[str] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    category: Mapped[str] = mapped_column(Enum)
    eligible: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)


class RelationshipRow(Base):
    __tablename__ = "relationships"
    __table_args__ = (
        # Rule 3: at most one open (pending or active) relationship per (holder, beneficiary).
        Index(
            "uq_relationships_open_pair",
            "holder_id",
            "beneficiary_id",
            unique=True,
            sqlite_where=text("status IN ('PENDING_CONSENT', 'ACTIVE')"),
            postgresql_where=text("status IN ('PENDING_CONSENT', 'ACTIVE')"),
        ),
        *(CheckConstraint(condition, name=name) for name, condition in LEDGER_LIMIT_CHECKS.items()),
        # The rolling reconcile follows the dissolutions in this order (reconcile_dissolved.py).
        Index("ix_relationships_dissolved_at", "dissolved_at", "relationship_id"),
    )

    relationship_id: Mapped[str] = mapped_column(RelationshipId, primary_key=True)
    holder_id: Mapped[str] = mapped_column(ForeignKey("participants.participant_id"), index=True)
    beneficiary_id: Mapped[str] = mapped_column(
        ForeignKey("participants.participant_id"), index=True
    )
    relation: Mapped[str] = mapped_column(Enum)
    status: Mapped[str] = mapped_column(Enum)
    holder_consented: Mapped[bool] = mapped_column(Boolean, default=False)
    beneficiary_consented: Mapped[bool] = mapped_column(Boolean, default=False)
    created_channel: Mapped[str] = mapped_column(Enum)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    activated_at: Mapped[datetime | None] = mapped_column(Timestamp)
    dissolved_at: Mapped[datetime | None] = mapped_column(Timestamp)
    dissolution_reason: Mapped[str | None] = mapped_column(Enum)
    # Running totals (never decrease); see domain.model.QuotaTotals for the conservation rule.
    allocated_total_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    released_total_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    captured_total_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    refunded_to_quota_total_fen: Mapped[int] = mapped_column(BigInteger, default=0)


class RelationshipEventRow(Base):
    """Audit trail: every change of a relationship with the channel that made it."""

    __tablename__ = "relationship_events"

    event_id: Mapped[int] = mapped_column(BigIdentity, primary_key=True, autoincrement=True)
    relationship_id: Mapped[str] = mapped_column(
        ForeignKey("relationships.relationship_id"), index=True
    )
    event: Mapped[str] = mapped_column(Enum)
    party: Mapped[str | None] = mapped_column(Enum)
    # The channel principal, or SYSTEM for insurance events.
    channel: Mapped[str] = mapped_column(Enum)
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class LedgerEntryRow(Base):
    """One row for every movement of money; amounts are positive, the kind gives the direction."""

    __tablename__ = "ledger_entries"

    entry_id: Mapped[int] = mapped_column(BigIdentity, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(Enum, index=True)
    # The personal account's owner (the holder) whose money this is.
    holder_id: Mapped[str] = mapped_column(ForeignKey("participants.participant_id"), index=True)
    relationship_id: Mapped[str | None] = mapped_column(
        ForeignKey("relationships.relationship_id"), index=True
    )
    authorization_id: Mapped[str | None] = mapped_column(Id, index=True)
    merchant_id: Mapped[str | None] = mapped_column(Id)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    channel: Mapped[str | None] = mapped_column(Enum)
    # Settlement: the pooling regions whose agencies this movement concerns (captures, refunds).
    holder_region: Mapped[str | None] = mapped_column(String(6))
    merchant_region: Mapped[str | None] = mapped_column(String(6))
    created_at: Mapped[datetime] = mapped_column(Timestamp, index=True)


class IdempotencyRecordRow(Base):
    """The first answer to an idempotent write, returned again on a retry with the same key."""

    __tablename__ = "idempotency_records"

    scope: Mapped[str] = mapped_column(String(96), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(Id, primary_key=True)
    request_digest: Mapped[str] = mapped_column(String(64))
    response: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class AuthorizationRow(Base):
    """The journal of every authorization decision, declines included (written in batches off
    the hot path). Kept at least until the month's settlement closes."""

    __tablename__ = "authorizations"
    __table_args__ = (
        # Idempotency keys are unique per merchant (Redis checks them per beneficiary at
        # decision time; this catches a key reused for another beneficiary, after the fact).
        Index("uq_authorizations_merchant_key", "merchant_id", "idempotency_key", unique=True),
        # A rebuild of the hot state reads each page's open holds by beneficiary and expiry:
        # only the rows not yet expired are visited (the index serves lookups by beneficiary).
        Index("ix_authorizations_beneficiary_expires", "beneficiary_id", "expires_at"),
    )

    authorization_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(Id)
    beneficiary_id: Mapped[str] = mapped_column(Id)
    purpose: Mapped[str] = mapped_column(Enum)
    decision: Mapped[str] = mapped_column(Enum)
    decline_reason: Mapped[str | None] = mapped_column(Enum)
    requested_fen: Mapped[int] = mapped_column(BigInteger)
    approved_fen: Mapped[int] = mapped_column(BigInteger)
    # "relationship_id=fen;..." in funding order: unbounded, as a split's quotas are (a
    # VARCHAR(2000) held ~27 parts of 64-character ids; migration 0011).
    funding: Mapped[str] = mapped_column(Text)
    idempotency_key: Mapped[str] = mapped_column(Id)
    request_digest: Mapped[str] = mapped_column(String(64))
    # The AuthorizeResponse as first sent, for replays after Redis was lost.
    response: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    # Indexed: a rebuild of the hot state finds the holds still open by their expiry.
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp, index=True)
    # When the hold was voided (Void, or its capture refused): such a hold is not put back
    # when Redis is rebuilt from SQL. Captured holds have a CaptureRow; expired ones expired.
    voided_at: Mapped[datetime | None] = mapped_column(Timestamp, default=None)


# The columns a decision is written with, in the table's order: a decision row is a dict with
# these keys (service/journal.py, runtime/release_abandoned_holds.py). voided_at is set later,
# by a void.
DECISION_COLUMNS: tuple[str, ...] = tuple(
    column.name for column in AuthorizationRow.__table__.columns if column.name != "voided_at"
)


class CaptureRow(Base):
    """A captured authorization: the money the merchant is owed (less refunds)."""

    __tablename__ = "captures"

    authorization_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(Id, index=True)
    merchant_region: Mapped[str] = mapped_column(String(6))
    beneficiary_id: Mapped[str] = mapped_column(Id)
    purpose: Mapped[str] = mapped_column(Enum)
    approved_fen: Mapped[int] = mapped_column(BigInteger)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    refunded_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    idempotency_key: Mapped[str] = mapped_column(Id)
    captured_at: Mapped[datetime] = mapped_column(Timestamp, index=True)


class CapturePartRow(Base):
    """The part of a capture drawn from one relationship's quota."""

    __tablename__ = "capture_parts"

    authorization_id: Mapped[str] = mapped_column(
        ForeignKey("captures.authorization_id"), primary_key=True
    )
    relationship_id: Mapped[str] = mapped_column(
        ForeignKey("relationships.relationship_id"), primary_key=True
    )
    # Funding order within the authorization; refunds go back in reverse order.
    position: Mapped[int] = mapped_column(Integer)
    holder_id: Mapped[str] = mapped_column(Id)
    # The holder's pooling region when captured: whose agency pays (settlement).
    holder_region: Mapped[str] = mapped_column(String(6))
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    refunded_fen: Mapped[int] = mapped_column(BigInteger, default=0)


class RefundRow(Base):
    __tablename__ = "refunds"

    refund_id: Mapped[int] = mapped_column(BigIdentity, primary_key=True, autoincrement=True)
    authorization_id: Mapped[str] = mapped_column(
        ForeignKey("captures.authorization_id"), index=True
    )
    merchant_id: Mapped[str] = mapped_column(Id)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str] = mapped_column(Id)
    created_at: Mapped[datetime] = mapped_column(Timestamp, index=True)


class SettlementMonthRow(Base):
    """A closed month. Its rows below are written once, in the closing transaction, and never
    changed; a refund of a closed month's capture is settled in the month it happens."""

    __tablename__ = "settlement_months"

    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    closed_at: Mapped[datetime] = mapped_column(Timestamp)
    captured_fen: Mapped[int] = mapped_column(BigInteger)
    refunded_fen: Mapped[int] = mapped_column(BigInteger)
    safety_percent: Mapped[int] = mapped_column(Integer)


class SettlementMerchantPayableRow(Base):
    __tablename__ = "settlement_merchant_payables"

    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(Id, primary_key=True)
    # A row per region the merchant's captures were made in: one whose pooling region changed
    # within the month is paid by each agency for the captures made under it.
    pooling_region: Mapped[str] = mapped_column(String(6), primary_key=True)
    captured_fen: Mapped[int] = mapped_column(BigInteger)
    refunded_fen: Mapped[int] = mapped_column(BigInteger)
    payable_fen: Mapped[int] = mapped_column(BigInteger)


class SettlementRegionFlowRow(Base):
    __tablename__ = "settlement_region_flows"

    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    holder_region: Mapped[str] = mapped_column(String(6), primary_key=True)
    merchant_region: Mapped[str] = mapped_column(String(6), primary_key=True)
    captured_fen: Mapped[int] = mapped_column(BigInteger)
    refunded_fen: Mapped[int] = mapped_column(BigInteger)
    net_fen: Mapped[int] = mapped_column(BigInteger)


class SettlementProvincePositionRow(Base):
    __tablename__ = "settlement_province_positions"

    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    province: Mapped[str] = mapped_column(String(2), primary_key=True)
    pays_fen: Mapped[int] = mapped_column(BigInteger)
    receives_fen: Mapped[int] = mapped_column(BigInteger)
    net_fen: Mapped[int] = mapped_column(BigInteger)


class SettlementPrepaidFundRow(Base):
    __tablename__ = "settlement_prepaid_funds"

    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    pooling_region: Mapped[str] = mapped_column(String(6), primary_key=True)
    outflow_fen: Mapped[int] = mapped_column(BigInteger)
    next_month_fen: Mapped[int] = mapped_column(BigInteger)
    adjustment_fen: Mapped[int] = mapped_column(BigInteger)
