"""Decisions journaled against a rebuild of the hot state (runtime/rebuild.py).

A decision made in Redis is journaled to SQL before its till hears it, and a rebuild puts back
the open holds SQL has. A journal write that commits after the rebuild read SQL would be missed
by it, and Redis would offer that money again. So a journal transaction takes the journal's
lock shared (`for_journaling`) and then checks, inside it, that the generation its decisions were
made in is still the one published; a rebuild first marks Redis REBUILDING, then takes the lock
exclusively in a transaction of its own and lets it go at once (`wait_for_journal`): every
journal write that read the generation before the mark has committed by then (and is read by
the rebuild), and every later one reads REBUILDING and refuses its decisions (UNAVAILABLE: the
till retries, and the retry is decided in the rebuilt Redis).

On PostgreSQL these are advisory locks (storage/sql/advisory_locks.py). On SQLite every write
transaction holds the database's write lock already (BEGIN IMMEDIATE, storage/sql/database.py),
so the rebuild's own transaction waits for the journal's once it has begun: `wait_for_journal`
runs a statement for that, since a session that runs none never begins one. (Processes sharing
the file also take turns through the writer lock, storage/sql/writer_lock.py, which orders them
the same way; the fence does not depend on it.)
"""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from authz_server.storage.sql.advisory_locks import JOURNAL_LOCK, exclusive, shared
from authz_server.storage.sql.dbapi import fetch_all

_SHARED = shared(JOURNAL_LOCK)
_EXCLUSIVE = text(exclusive(JOURNAL_LOCK))


def for_journaling(connection: Connection) -> None:
    """Taken by a journal transaction before it reads the published generation. On the driver's
    cursor (storage/sql/dbapi.py): SQLAlchemy's execution around it was most of its client CPU,
    and every journal batch takes it."""
    if connection.dialect.name == "postgresql":
        fetch_all(connection, _SHARED, ())


def wait_for_journal(session: Session) -> None:
    """A rebuild's transaction of its own, after it marked Redis REBUILDING: returns when every
    journal write that read the generation before the mark has committed."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_EXCLUSIVE)
    else:  # SQLite: begin (BEGIN IMMEDIATE waits for the journal's write transaction)
        session.execute(text("SELECT 1"))
