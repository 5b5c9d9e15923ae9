"""Migration 0010 down and up again on PostgreSQL with data in the tables that refer to
relationships (capture parts, ledger entries, events): the foreign keys stay, the joins across
the collations ("C" against the referring columns' default) still work, and the service writes
after it."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from alembic import command
from sqlalchemy import create_engine, text

from authz_server.storage.sql.migrate import alembic_config
from tests.harness import Harness
from tests.test_authorization_rules import (
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    figures,
    refund,
    register_merchants,
)

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"), reason="PostgreSQL's collations"
)


def _facts(url: str) -> tuple[object, ...]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            collation = connection.scalar(
                text(
                    "SELECT collation_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = 'relationships'"
                    " AND column_name = 'relationship_id'"
                )
            )
            fks = connection.scalar(
                text(
                    "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
                    " AND confrelid = to_regclass('relationships')"
                )
            )
            joined = connection.execute(
                text(
                    "SELECT count(*), sum(p.amount_fen) FROM capture_parts p"
                    " JOIN relationships r ON r.relationship_id = p.relationship_id"
                )
            ).one()
            ledger = connection.scalar(
                text(
                    "SELECT count(*) FROM ledger_entries l JOIN relationships r"
                    " USING (relationship_id)"
                )
            )
            return collation, fks, tuple(joined), ledger
    finally:
        engine.dispose()


def test_0010_down_and_up_with_data(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    try:
        with grpc.insecure_channel(harness.address) as channel:
            from authz_server.generated.medwallet.v1 import (
                authorization_pb2_grpc,
                registry_pb2_grpc,
                relationship_pb2_grpc,
            )

            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            relationships = relationship_pb2_grpc.RelationshipServiceStub(channel)
            authorizations = authorization_pb2_grpc.AuthorizationServiceStub(channel)
            register_merchants(registry)
            people = family(registry, relationships, 10_000, 10_000)
            answer = authorize(authorizations, HOSPITAL, people.beneficiary_id, MEDICAL, 12_000)
            capture(authorizations, HOSPITAL, answer.authorization_id)
            refund(authorizations, HOSPITAL, answer.authorization_id, 3_000)
            before = _facts(harness.database_url)
            assert before[0] == "C"
            config = alembic_config(harness.database_url)
            command.downgrade(config, "0009")
            down = _facts(harness.database_url)
            command.upgrade(config, "head")
            up = _facts(harness.database_url)
            assert (down[0], down[1:]) == (None, before[1:])
            assert up == before
            # the service writes on the migrated table (a fresh pool: plans cached before
            # the ALTER are the deployment's restart's business)
            harness.app.database.engine.dispose()
            refund(authorizations, HOSPITAL, answer.authorization_id, 1_000)
            low, high = people.relationship_ids
            assert figures(relationships, low)[2] + figures(relationships, high)[2] == 8_000
    finally:
        harness.close()
