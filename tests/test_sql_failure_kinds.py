"""storage/sql/failures.py names real database errors by kind (medwallet_sql_unavailable_total):
SQLite's write lock past its busy timeout, and on PostgreSQL a lock timeout, a statement
timeout and a connection its server ended. Each error is raised by a real database."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from authz_server.storage.sql.failures import failure_kind

POSTGRESQL = os.environ.get("TEST_DATABASE_URL")


def _raised(run: object) -> OperationalError:
    with pytest.raises(OperationalError) as raised:
        run()  # type: ignore[operator]
    return raised.value


def test_sqlites_write_lock_past_its_busy_timeout_is_busy(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'busy.sqlite3'}")
    try:
        with engine.connect() as holder, engine.connect() as other:
            holder.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            holder.commit()
            holder.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, held
            other.exec_driver_sql("PRAGMA busy_timeout = 0")
            error = _raised(lambda: other.exec_driver_sql("INSERT INTO t VALUES (1)"))
            holder.rollback()
    finally:
        engine.dispose()
    assert failure_kind(error) == "busy"


@pytest.mark.skipif(not POSTGRESQL, reason="PostgreSQL's errors (TEST_DATABASE_URL)")
def test_postgresqls_lock_and_statement_timeouts_and_an_ended_connection() -> None:
    assert POSTGRESQL
    engine = create_engine(POSTGRESQL)
    try:
        with engine.connect() as holder, engine.connect() as other:
            holder.execute(text("SELECT pg_advisory_lock(424242)"))
            other.execute(text("SET lock_timeout = '50ms'"))
            locked = _raised(lambda: other.execute(text("SELECT pg_advisory_lock(424242)")))
            other.rollback()
            holder.execute(text("SELECT pg_advisory_unlock(424242)"))
            other.execute(text("SET statement_timeout = '50ms'"))
            slow = _raised(lambda: other.execute(text("SELECT pg_sleep(5)")))
            other.rollback()
            pid = other.execute(text("SELECT pg_backend_pid()")).scalar_one()
            holder.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            ended = _raised(lambda: other.execute(text("SELECT 1")))
    finally:
        engine.dispose()
    assert (failure_kind(locked), failure_kind(slow)) == ("lock_timeout", "statement_timeout")
    assert failure_kind(ended) == "connection"
