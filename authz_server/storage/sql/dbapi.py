"""Statements run on the DBAPI cursor itself, inside a SQLAlchemy transaction: INSERTs of many
rows at once (executemany on plain tuples) and the capture batch's reads.

SQLAlchemy's Core costs most of a batch's Python time (per statement: cache-key generation,
execution context, result processing; per row: a parameter dict and type processing). That
time holds the GIL while the event loop waits for it, and a capture batch made ten such
statements. Here an INSERT is built once per table and dialect, and what SQLAlchemy would do
to a value on the way in is still done, by the column types' own bind processors (SQLite
stores datetimes as text in SQLAlchemy's format, so the ORM reads them back as it wrote them).
Everything goes through the transaction's connection, so it commits or rolls back with the
rest of the transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Dialect, Table
from sqlalchemy.exc import DBAPIError


def marker(dialect: Dialect) -> str:
    """The DBAPI's positional parameter marker: ? for sqlite3, %s for psycopg."""
    return "?" if dialect.paramstyle == "qmark" else "%s"


def placeholders(dialect: Dialect, count: int) -> str:
    """The markers of `count` values ("?, ?, ?"), for a VALUES or an IN list."""
    return ", ".join([marker(dialect)] * count)


def _wrapped(dialect: Dialect, sql: str, error: Exception) -> BaseException:
    return DBAPIError.instance(
        sql, None, error, dialect.loaded_dbapi.Error, dialect=dialect, ismulti=True
    )


@contextmanager
def _cursor(connection: Connection, sql: str) -> Iterator[Any]:
    """A cursor of the connection's DBAPI connection, inside its transaction; the driver's errors
    raised as SQLAlchemy raises them (a lock or a lost connection is
    sqlalchemy.exc.OperationalError, a constraint IntegrityError), so callers handle one kind."""
    dialect = connection.dialect
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None
    cursor = None
    try:
        cursor = dbapi_connection.cursor()  # fails too on a closed connection
        yield cursor
    except dialect.loaded_dbapi.Error as error:
        raise _wrapped(dialect, sql, error) from error
    finally:
        if cursor is not None:
            cursor.close()


def execute(connection: Connection, sql: str) -> None:
    """One statement without parameters or rows (BEGIN IMMEDIATE)."""
    with _cursor(connection, sql) as cursor:
        cursor.execute(sql)


def fetch_all(connection: Connection, sql: str, parameters: Sequence[Any]) -> list[Any]:
    """The rows of one query, as tuples."""
    with _cursor(connection, sql) as cursor:
        cursor.execute(sql, parameters)
        return list(cursor.fetchall())


def run_many(connection: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """One statement for every row (cursor.executemany). Returns the rows it changed, as the
    driver counts them (the sum over the rows on sqlite3 and psycopg 3; -1 where unknown)."""
    if not rows:
        return 0
    with _cursor(connection, sql) as cursor:
        cursor.executemany(sql, rows)
        return int(cursor.rowcount)


@dataclass(frozen=True)
class BulkInsert:
    """The INSERT of `columns` of one table for one dialect: SQL text, and the positions of the
    values that SQLAlchemy's column types convert, with their converters."""

    sql: str
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]

    @classmethod
    def of(
        cls,
        table: Table,
        dialect: Dialect,
        columns: Sequence[str] | None = None,
        *,
        skip_conflicts: bool = False,
    ) -> BulkInsert:
        """`columns` default to all of the table's, in its order. `skip_conflicts` adds ON
        CONFLICT DO NOTHING (no target: any unique constraint; SQLite and PostgreSQL)."""
        names = tuple(columns) if columns is not None else tuple(c.name for c in table.columns)
        quote = dialect.identifier_preparer.quote
        sql = (
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(name) for name in names)})"
            f" VALUES ({placeholders(dialect, len(names))})"
        )
        if skip_conflicts:
            sql += " ON CONFLICT DO NOTHING"
        processors = []
        for index, name in enumerate(names):
            column_type = table.columns[name].type
            processor = column_type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors.append((index, processor))
        return cls(sql, tuple(processors))

    def values(self, rows: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
        """The rows as the DBAPI takes them (each in `columns` order)."""
        if not self.processors:
            return list(rows)
        processors = self.processors
        converted: list[Sequence[Any]] = []
        for row in rows:
            value = list(row)
            for index, process in processors:
                value[index] = process(value[index])
            converted.append(value)
        return converted

    def run(self, connection: Connection, rows: Sequence[Sequence[Any]]) -> int:
        """Inserts the rows; returns how many were inserted as the driver counts them."""
        return run_many(connection, self.sql, self.values(rows))
