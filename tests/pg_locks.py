"""What PostgreSQL's lock table says of a test's own schema (tests/harness.py fresh_database: a
private schema per session, so the other pytest workers' waits do not count): the lock-order
tests hold one writer at a chosen point and let the other go on only once it waits."""

from __future__ import annotations

import time

from sqlalchemy import create_engine, text

# How long a writer may take to reach its wait for the held row.
WAIT_SECONDS = 10.0


def waiting_for_rows(url: str, *tables: str) -> int:
    """Backends waiting for a row of these tables of the schema `url` names (any of its tables
    when none is named). The first waiter for a row holds the row's tuple lock while it waits
    for the holder's transaction."""
    schema = url.rsplit("csearch_path%3D", 1)[1]
    engine = create_engine(url.split("?")[0])
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(
                    text(
                        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                        " JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE l.locktype = 'tuple' AND n.nspname = :schema"
                        " AND (cardinality(CAST(:tables AS text[])) = 0"
                        " OR c.relname = ANY(CAST(:tables AS text[])))"
                    ),
                    {"schema": schema, "tables": list(tables)},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def waited_for_rows(url: str, *tables: str, seconds: float = WAIT_SECONDS) -> bool:
    """Whether, within `seconds`, a backend waits for a row of these tables (waiting_for_rows)."""
    deadline = time.monotonic() + seconds
    while not waiting_for_rows(url, *tables):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
