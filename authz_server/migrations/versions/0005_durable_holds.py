"""durable holds: a void is recorded in SQL, and open holds are found by their expiry

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("authorizations") as batch:
        batch.add_column(sa.Column("voided_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index(batch.f("ix_authorizations_expires_at"), ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("authorizations") as batch:
        batch.drop_index(batch.f("ix_authorizations_expires_at"))
        batch.drop_column("voided_at")
