"""Migration 0009 (merchant payables keyed by region): its downgrade is refused, naming the
rows, where a month has a merchant under two regions, and goes through once the operator has
merged them. On SQLite the refusal used to come half-way through the batch copy (a raw
IntegrityError naming nothing) and left its copy table behind, so the downgrade failed again
after the merge (a second audit)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from authz_server.storage.sql.migrate import alembic_config
from tests.harness import drop_database, fresh_database


def test_a_refused_downgrade_of_0009_can_be_run_again_once_the_rows_are_merged(
    tmp_path: Path,
) -> None:
    url = fresh_database(os.environ.get("TEST_DATABASE_URL"), tmp_path)
    config = alembic_config(url)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            for region, fen in (("110100", 100), ("440300", 50)):
                connection.execute(
                    text(
                        "INSERT INTO settlement_merchant_payables (month, merchant_id,"
                        " pooling_region, captured_fen, refunded_fen, payable_fen)"
                        " VALUES ('2025-02', 'moved', :region, :fen, 0, :fen)"
                    ),
                    {"region": region, "fen": fen},
                )
        with pytest.raises(RuntimeError, match="2025-02 moved"):  # two rows in February
            command.downgrade(config, "0008")
        with engine.begin() as connection:  # the operator merges them
            connection.execute(
                text("DELETE FROM settlement_merchant_payables WHERE pooling_region = '440300'")
            )
            connection.execute(
                text(
                    "UPDATE settlement_merchant_payables SET captured_fen = 150,"
                    " payable_fen = 150 WHERE merchant_id = 'moved'"
                )
            )
        command.downgrade(config, "0008")  # now it goes through
        primary_key = inspect(engine).get_pk_constraint("settlement_merchant_payables")
        assert primary_key["constrained_columns"] == ["month", "merchant_id"]
    finally:
        engine.dispose()
        drop_database(url)
