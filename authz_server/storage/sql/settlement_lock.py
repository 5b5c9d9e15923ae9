"""A month's close against the writes it counts (captures and refunds).

A month is closed once and its report never changes, so a capture or refund dated in that month
must be in SQL before the close reads the ledger, and one that commits after the close must be
dated after the month. Writers read the time for their rows inside their transaction, after
taking the writers' lock shared (`for_writing`). The close, once the month has ended, first
takes that lock exclusively in a transaction of its own and lets it go at once
(`wait_for_writers`): every write dated in the month has committed by then, and every later one
reads a time after the month's end. It does not hold it while it computes (a close over a large
month takes seconds, and every payment would wait). Closes take turns through a lock of their
own (`for_closing`), held for the close's transaction.

On PostgreSQL these are advisory locks (storage/sql/advisory_locks.py). On SQLite every write
transaction holds the database's write lock already, so there is nothing more to take.
"""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from authz_server.storage.sql.advisory_locks import CLOSE_LOCK, WRITERS_LOCK, exclusive, shared
from authz_server.storage.sql.dbapi import fetch_all

_WRITING = shared(WRITERS_LOCK)
_WRITING_TEXT = text(_WRITING)
_WAIT_FOR_WRITERS = text(exclusive(WRITERS_LOCK))
_CLOSING = text(exclusive(CLOSE_LOCK))


def for_writing(connection: Connection | Session) -> None:
    """Taken by a transaction that writes settled money, before it reads the time. A capture
    batch's (a Connection) on the driver's cursor, as the journal's fence: SQLAlchemy's
    execution around the statement costs more client CPU than the round trip."""
    if _dialect(connection) != "postgresql":
        return
    if isinstance(connection, Connection):
        fetch_all(connection, _WRITING, ())
    else:
        connection.execute(_WRITING_TEXT)


def wait_for_writers(session: Session) -> None:
    """A transaction of its own, once the month has ended: returns when every write that took
    the writers' lock before it has committed."""
    if _dialect(session) == "postgresql":
        session.execute(_WAIT_FOR_WRITERS)


def for_closing(session: Session) -> None:
    """Taken by a month's close before it reads anything: one close at a time."""
    if _dialect(session) == "postgresql":
        session.execute(_CLOSING)


def _dialect(connection: Connection | Session) -> str:
    bind = connection.get_bind() if isinstance(connection, Session) else connection
    return bind.dialect.name
