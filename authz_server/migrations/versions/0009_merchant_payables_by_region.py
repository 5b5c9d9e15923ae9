"""merchant payables by region: keyed on (month, merchant_id, pooling_region)

A merchant whose pooling region changed within a month was given one payable row under one of
its regions (MAX) for all its captures, while the region flows counted each capture under the
region it was made in: one agency was told to pay money another received. A row per region.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

NAME = "pk_settlement_merchant_payables"


def upgrade() -> None:
    with op.batch_alter_table("settlement_merchant_payables") as batch:
        batch.drop_constraint(NAME, type_="primary")
        batch.create_primary_key(NAME, ["month", "merchant_id", "pooling_region"])


def downgrade() -> None:
    # Refused, before anything changes, where a month has a merchant under two regions (the
    # narrower key would repeat; SQLite's batch copy would fail half-way and leave its copy).
    repeated = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT month, merchant_id FROM settlement_merchant_payables"
                " GROUP BY month, merchant_id HAVING COUNT(*) > 1 ORDER BY month, merchant_id"
            )
        )
        .all()
    )
    if repeated:
        shown = ", ".join(f"{month} {merchant}" for month, merchant in repeated[:10])
        raise RuntimeError(
            f"{len(repeated)} merchants have payables under two pooling regions in one month;"
            f" the schema before 0009 has one row per merchant and month: {shown}"
        )
    with op.batch_alter_table("settlement_merchant_payables") as batch:
        batch.drop_constraint(NAME, type_="primary")
        batch.create_primary_key(NAME, ["month", "merchant_id"])
