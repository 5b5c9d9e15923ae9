"""unbounded funding: authorizations.funding TEXT (was VARCHAR(2000))

The journal keeps an authorization's funding as "relationship_id=fen;..." in funding order, one
part per quota the split drew on. A beneficiary may have any number of holders, so a split may
have any number of parts: 2,000 characters held ~56 of the service's 32-digit ids, ~27 of
64-character bulk-loaded ones. Past that PostgreSQL refused the journal row (SQLite does not
enforce the length): the Authorize answered INTERNAL and its hold stayed in Redis, unjournaled.

On PostgreSQL VARCHAR to TEXT is binary-compatible: no table rewrite. SQLite ignores lengths;
its table is recreated by the batch only to keep the declared type in step with the model.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("authorizations") as batch:
        batch.alter_column(
            "funding", existing_type=sa.String(2000), type_=sa.Text(), existing_nullable=False
        )


def downgrade() -> None:
    with op.batch_alter_table("authorizations") as batch:
        batch.alter_column(
            "funding", existing_type=sa.Text(), type_=sa.String(2000), existing_nullable=False
        )
