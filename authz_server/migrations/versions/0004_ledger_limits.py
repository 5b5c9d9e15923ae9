"""ledger limits: CHECK constraints on the running totals of relationships

The ledger's limit (domain.model.QuotaTotals.within_ledger_limit) enforced by the database:
money out of a quota (captured - refunded_to_quota + released) never exceeds money into it
(allocated), no total is negative, and a quota gets back no more than was captured from it.

A database whose relationships already break the limit (a quota Redis let be over-spent before
this check existed) is not migrated: the migration stops and names them, since a constraint
added over such rows would refuse every later write of those relationships, refunds included.
Finance and an operator settle them first (deploy/RUNBOOK.md#medwalletledgerlimitexceeded).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 13:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Copied, not imported, from storage/sql/tables.py (LEDGER_LIMIT_CHECKS): a migration stays as
# it was written when the code moves on.
CHECKS = {
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
SHOWN = 20  # relationships named when some break the limit


def upgrade() -> None:
    within = " AND ".join(f"({condition})" for condition in CHECKS.values())
    broken = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT relationship_id, allocated_total_fen, released_total_fen,"
                " captured_total_fen, refunded_to_quota_total_fen FROM relationships"
                f" WHERE NOT ({within}) ORDER BY relationship_id"
            )
        )
        .all()
    )
    if broken:
        shown = "; ".join(
            f"{rid}: allocated {allocated}, released {released}, captured {captured},"
            f" refunded to quota {refunded}"
            for rid, allocated, released, captured, refunded in broken[:SHOWN]
        )
        raise RuntimeError(
            f"{len(broken)} relationships break the ledger's limit (captured - refunded to quota"
            f" + released <= allocated, totals >= 0); settle them before migrating"
            f" (deploy/RUNBOOK.md#medwalletledgerlimitexceeded): {shown}"
        )
    # SQLite cannot add a constraint to a table: batch mode copies the table into a new one
    # that has them (PostgreSQL: ALTER TABLE ... ADD CONSTRAINT).
    with op.batch_alter_table("relationships") as batch:
        for name, condition in CHECKS.items():
            batch.create_check_constraint(op.f(f"ck_relationships_{name}"), condition)


def downgrade() -> None:
    with op.batch_alter_table("relationships") as batch:
        for name in reversed(CHECKS):
            batch.drop_constraint(op.f(f"ck_relationships_{name}"), type_="check")
