"""open holds by beneficiary: authorizations indexed on (beneficiary_id, expires_at)

A rebuild of the hot state reads each page's open holds by beneficiary and expiry; on the
single-column beneficiary index it visited every decision of the month of those beneficiaries
(loadtest/rebuild_benchmark.py: 1,000,000 decisions, 100,000 relationships on SQLite, the open
holds' reads took 6 s of a 14 s rebuild). The two-column index finds only the ones not yet
expired, and serves every lookup by beneficiary the old one did, so it replaces it.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_authorizations_beneficiary_expires",
        "authorizations",
        ["beneficiary_id", "expires_at"],
        unique=False,
    )
    op.drop_index("ix_authorizations_beneficiary_id", table_name="authorizations")


def downgrade() -> None:
    op.create_index(
        "ix_authorizations_beneficiary_id", "authorizations", ["beneficiary_id"], unique=False
    )
    op.drop_index("ix_authorizations_beneficiary_expires", table_name="authorizations")
