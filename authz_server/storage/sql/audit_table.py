"""The audit trail: one row per (call, person) of every read and change of a person's
relationships, quotas, payments and refunds. Append-only: the service only inserts; rows leave
only by `purge-audit` once past the retention period."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from authz_server.storage.sql.tables import Base, BigIdentity, Id, Timestamp


class AuditRecordRow(Base):
    __tablename__ = "audit_records"
    __table_args__ = (
        Index("ix_audit_records_person_time", "person_id", "occurred_at", "record_id"),
        Index("ix_audit_records_occurred_at", "occurred_at"),
    )

    record_id: Mapped[int] = mapped_column(BigIdentity, primary_key=True, autoincrement=True)
    occurred_at: Mapped[datetime] = mapped_column(Timestamp)
    # NULL: the call named no person (an unknown relationship or authorization id).
    person_id: Mapped[str | None] = mapped_column(Id, nullable=True)
    principal_kind: Mapped[str] = mapped_column(String(16))
    principal_id: Mapped[str] = mapped_column(Id)
    credential: Mapped[str] = mapped_column(String(80))
    rpc: Mapped[str] = mapped_column(String(100))
    relationship_id: Mapped[str] = mapped_column(Id)
    authorization_id: Mapped[str] = mapped_column(Id)
    outcome: Mapped[str] = mapped_column(String(64))
