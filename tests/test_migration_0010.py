"""Migration 0010: on PostgreSQL, relationships.relationship_id sorts by code point whatever
the database's collation, so SQL's `ORDER BY relationship_id ... FOR UPDATE` (the capture batch,
the reconcile's pages) locks quotas in the order Python's sorted() gives the writers that lock
them one by one (a put-back settlement, a refund batch). A database created with a language's
collation is stood in for by giving the column one (ICU's en-US) before the migration: there
'B' sorts after 'a' and '_x' first, and two writers would lock a family's quotas in opposite
orders."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from authz_server.storage.sql.migrate import alembic_config
from authz_server.storage.sql.tables import ParticipantRow, RelationshipRow
from tests.harness import drop_database, fresh_database

IDS = ["a", "B", "c", "_x", "Z", "a-1", "a_1", "A1"]
LANGUAGE_COLLATION = "en-US-x-icu"


def _add_relationships(url: str) -> None:
    engine = create_engine(url)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        with Session(engine) as session, session.begin():
            for person in ("holder", "beneficiary"):
                session.add(
                    ParticipantRow(
                        participant_id=person,
                        scheme="EMPLOYEE",
                        pooling_region="110100",
                        status="ACTIVE",
                        created_at=now,
                        updated_at=now,
                    )
                )
            session.flush()
            for relationship_id in IDS:  # dissolved: the open-pair index allows many
                session.add(
                    RelationshipRow(
                        relationship_id=relationship_id,
                        holder_id="holder",
                        beneficiary_id="beneficiary",
                        relation="PARENT",
                        status="DISSOLVED",
                        created_channel="APP",
                        created_at=now,
                    )
                )
    finally:
        engine.dispose()


def _locked_order(url: str) -> list[str]:
    engine = create_engine(url)
    lock = " FOR UPDATE" if engine.dialect.name == "postgresql" else ""
    try:
        with engine.begin() as connection:
            query = f"SELECT relationship_id FROM relationships ORDER BY relationship_id{lock}"
            return list(connection.scalars(text(query)))
    finally:
        engine.dispose()


def test_sql_locks_relationships_in_pythons_order_whatever_the_databases_collation(
    tmp_path: Path,
) -> None:
    database_url = os.environ.get("TEST_DATABASE_URL")
    url = fresh_database(database_url, tmp_path)
    try:
        if database_url:
            engine = create_engine(url)
            with engine.begin() as connection:
                if not connection.scalar(
                    text("SELECT count(*) FROM pg_collation WHERE collname = :name"),
                    {"name": LANGUAGE_COLLATION},
                ):
                    pytest.skip(f"this PostgreSQL has no {LANGUAGE_COLLATION} collation (ICU)")
            engine.dispose()
            config = alembic_config(url)
            command.downgrade(config, "0009")
            engine = create_engine(url)
            with engine.begin() as connection:  # a database whose default is a language's
                connection.execute(
                    text(
                        "ALTER TABLE relationships ALTER COLUMN relationship_id"
                        f' TYPE VARCHAR(64) COLLATE "{LANGUAGE_COLLATION}"'
                    )
                )
            engine.dispose()
            _add_relationships(url)
            assert _locked_order(url) != sorted(IDS)  # the deadlock's premise, before 0010
            command.upgrade(config, "head")
        else:
            _add_relationships(url)
        assert _locked_order(url) == sorted(IDS)
    finally:
        drop_database(url)
