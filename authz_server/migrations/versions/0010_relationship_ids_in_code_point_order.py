"""relationship ids in code point order: relationships.relationship_id COLLATE "C" (PostgreSQL)

Every writer that locks many quotas takes their rows in relationship id order so that two of
them cannot deadlock: some in SQL (`ORDER BY relationship_id ... FOR UPDATE`: the capture batch,
the reconcile's pages), some in Python's order (`sorted`: code points). The two orders agree
only where the column sorts by code point. The service's own ids are lowercase hex (the same
order either way), but bulk-loaded ids may mix case and punctuation, and a database created
with a language's collation (en_US.UTF-8, ICU) sorts 'B' after 'a' and ignores '_' at first:
two writers could then lock one family's quotas in opposite orders (a deadlock: UNAVAILABLE to
a till, no money moved). "C" on the column makes SQL's order Python's, whatever the database's
default. SQLite compares text with memcmp (BINARY), which is already code point order for UTF-8.

The primary key's index (and the (dissolved_at, relationship_id) one) is rebuilt under an
ACCESS EXCLUSIVE lock on the table: seconds for a province's millions of relationships, in the
maintenance window a schema change is run in anyway. The columns that refer to it keep their
collation: they are joined and compared for equality, never locked in order.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            'ALTER TABLE relationships ALTER COLUMN relationship_id TYPE VARCHAR(64) COLLATE "C"'
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "ALTER TABLE relationships ALTER COLUMN relationship_id TYPE VARCHAR(64)"
            ' COLLATE "default"'
        )
