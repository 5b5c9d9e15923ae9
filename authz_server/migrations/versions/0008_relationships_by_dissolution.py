"""relationships by dissolution: indexed on (dissolved_at, relationship_id)

The rolling reconcile makes sure Redis has every dissolution SQL committed (a dissolve whose
Redis step was lost left its quota active there), following them in the order they were
dissolved (runtime/reconcile_dissolved.py): without the index each of its turns would read the
whole table.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # CONCURRENTLY on PostgreSQL (outside a transaction): a plain CREATE INDEX would block every
    # write to relationships (each capture's) while it reads the whole table.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_relationships_dissolved_at",
            "relationships",
            ["dissolved_at", "relationship_id"],
            unique=False,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_relationships_dissolved_at",
            table_name="relationships",
            postgresql_concurrently=True,
        )
