"""The raw executemany helper: rows read back through SQLAlchemy as written, and the driver's
errors raised as SQLAlchemy's (so a lock or a lost connection stays OperationalError, which
the capture writer answers UNAVAILABLE). On the harness's database (SQLite, or PostgreSQL with
TEST_DATABASE_URL)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from authz_server.storage.sql.dbapi import BulkInsert, run_many
from authz_server.storage.sql.tables import IdempotencyRecordRow
from tests.harness import Harness

records = IdempotencyRecordRow.__table__
COLUMNS = ("scope", "idempotency_key", "request_digest", "response", "created_at")


def insert(connection: Connection) -> BulkInsert:
    return BulkInsert.of(records, connection.dialect, COLUMNS)  # type: ignore[arg-type]


def test_rows_read_back_as_written(harness: Harness) -> None:
    scope = f"bulk-{uuid.uuid4().hex[:8]}"
    moment = datetime(2026, 1, 31, 16, 0, 0, 123456, tzinfo=UTC)
    rows = [(scope, f"key-{n}", "ab" * 32, bytes([n, 0, 255]), moment) for n in range(3)]
    with harness.app.database.engine.begin() as connection:
        insert(connection).run(connection, rows)
    with harness.app.database.engine.connect() as connection:
        back = connection.execute(
            select(records.c.idempotency_key, records.c.response, records.c.created_at)
            .where(records.c.scope == scope)
            .order_by(records.c.idempotency_key)
        ).all()
    assert [(key, bytes(response)) for key, response, _ in back] == [
        (f"key-{n}", bytes([n, 0, 255])) for n in range(3)
    ]
    assert all(created.replace(tzinfo=UTC) == moment for _, _, created in back)


def test_a_constraint_is_integrity_error_and_nothing_of_the_batch_stays(harness: Harness) -> None:
    scope = f"bulk-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    twice = [(scope, "same", "ab" * 32, b"x", now), (scope, "same", "ab" * 32, b"y", now)]
    with pytest.raises(IntegrityError), harness.app.database.engine.begin() as connection:
        insert(connection).run(connection, twice)
    with harness.app.database.engine.connect() as connection:
        left = connection.execute(select(records.c.scope).where(records.c.scope == scope)).all()
    assert left == []


def test_a_driver_error_is_raised_as_sqlalchemys(harness: Harness) -> None:
    engine = harness.app.database.engine
    with pytest.raises(DBAPIError) as raised, engine.begin() as connection:
        run_many(connection, "INSERT INTO no_such_table (a) VALUES (1)", [()])
    # sqlite3 calls it an OperationalError, psycopg a ProgrammingError: SQLAlchemy's own class
    # for each, as if SQLAlchemy had run the statement
    assert isinstance(raised.value.orig, engine.dialect.loaded_dbapi.Error)
    expected = OperationalError if engine.dialect.name == "sqlite" else ProgrammingError
    assert isinstance(raised.value, expected)
