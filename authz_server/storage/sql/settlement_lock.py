"""A month's close against the writes it counts (captures and refunds).

A month is closed once and its report never changes, so a capture or refund dated in that month
must be in SQL before the close reads the ledger, and one that commits after the close must be
dated after the month. Writers read the time for their rows inside their transaction, after
taking this lock; the close takes it before it reads. On PostgreSQL it is an advisory lock:
shared for writers (they do not wait for each other), exclusive for the close (which also
serializes two closes of one month). On SQLite every write transaction holds the database's
write lock already, so there is nothing more to take.
"""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

# Any fixed 64-bit number, the same in every process of the service.
SETTLEMENT_LOCK = 0x6D77_7365_7474_6C65  # "mwsettle"


def for_writing(connection: Connection | Session) -> None:
    """Taken by a transaction that writes settled money, before it reads the time."""
    if _dialect(connection) == "postgresql":
        connection.execute(
            text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": SETTLEMENT_LOCK}
        )


def for_closing(session: Session) -> None:
    """Taken by a month's close before it reads anything."""
    if _dialect(session) == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SETTLEMENT_LOCK})


def _dialect(connection: Connection | Session) -> str:
    bind = connection.get_bind() if isinstance(connection, Session) else connection
    return bind.dialect.name
