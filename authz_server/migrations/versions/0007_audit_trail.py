"""audit trail

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column(
            "record_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=True),
        sa.Column("principal_kind", sa.String(length=16), nullable=False),
        sa.Column("principal_id", sa.String(length=64), nullable=False),
        sa.Column("credential", sa.String(length=80), nullable=False),
        sa.Column("rpc", sa.String(length=100), nullable=False),
        sa.Column("relationship_id", sa.String(length=64), nullable=False),
        sa.Column("authorization_id", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("record_id", name=op.f("pk_audit_records")),
    )
    op.create_index(
        "ix_audit_records_person_time",
        "audit_records",
        ["person_id", "occurred_at", "record_id"],
    )
    op.create_index("ix_audit_records_occurred_at", "audit_records", ["occurred_at"])


def downgrade() -> None:
    op.drop_index("ix_audit_records_occurred_at", table_name="audit_records")
    op.drop_index("ix_audit_records_person_time", table_name="audit_records")
    op.drop_table("audit_records")
