"""Times closing a month with N ledger rows (default 1,000,000) on PostgreSQL.

    python loadtest/settlement_benchmark.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/settlebench

It empties that database's public schema, migrates it, writes N capture/refund ledger rows for
January 2025 spread over 400 merchants and 31 provinces with one INSERT … SELECT over
generate_series, then closes the month through SettlementService (one INSERT … SELECT per table)
and prints the time. Use a database of its own: it is wiped.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from sqlalchemy import create_engine, text

from authz_server.domain.settlement import Month
from authz_server.runtime.progress import Progress
from authz_server.service.settlement import SettlementService
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.migrate import upgrade_to_head

PROVINCES = ["11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36",
             "37", "41", "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62",
             "63", "64", "65"]  # fmt: skip
FILL = """
INSERT INTO participants (participant_id, scheme, pooling_region, status, balance_fen,
                          created_at, updated_at)
SELECT 'bench-holder', 'EMPLOYEE', '110100', 'ACTIVE', 0, now(), now();
INSERT INTO ledger_entries (kind, holder_id, amount_fen, merchant_id, holder_region,
                            merchant_region, created_at)
SELECT CASE WHEN i % 20 = 0 THEN 'REFUND_TO_QUOTA' ELSE 'CAPTURE' END,
       'bench-holder',
       100 + (i * 7919) % 50000,
       'merchant-' || (i % 400),
       (ARRAY[{provinces}])[1 + (i / 400) % 31] || '0100',
       (ARRAY[{provinces}])[1 + (i % 400) % 31] || '0100',
       TIMESTAMPTZ '2025-01-01 00:00:00+08' + (i % 2678400) * INTERVAL '1 second'
FROM generate_series(CAST(1 AS BIGINT), :rows) AS i;
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--rows", type=int, default=1_000_000)
    arguments = parser.parse_args()
    engine = create_engine(arguments.database_url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    upgrade_to_head(arguments.database_url)
    provinces = ", ".join(f"'{p}'" for p in PROVINCES)
    with Progress(2, "preparing", unit="steps") as progress:
        started = time.perf_counter()
        with engine.begin() as connection:
            for statement in FILL.format(provinces=provinces).split(";\n"):
                if statement.strip():
                    connection.execute(text(statement), {"rows": arguments.rows})
        progress.advance(1)
        with engine.begin() as connection:
            connection.execute(text("ANALYZE ledger_entries"))
        progress.advance(1)
    fill_seconds = time.perf_counter() - started
    database = Database(arguments.database_url)
    service = SettlementService(database, 120, clock=lambda: datetime(2025, 3, 1, tzinfo=UTC))
    month = Month(2025, 1)
    with Progress(1, f"closing {month}", unit="months") as progress:
        started = time.perf_counter()
        writers_done_at = database.transaction(service.wait_for_writers)
        report, _ = database.transaction(
            lambda session: service.close_in(session, month, writers_done_at)
        )
        close_seconds = time.perf_counter() - started
        progress.advance(1)
    database.close()
    print(
        f"{arguments.rows:,} ledger rows written in {fill_seconds:.1f} s; month closed in "
        f"{close_seconds:.2f} s: {len(report.merchant_payables)} merchant payables, "
        f"{len(report.region_flows)} region pairs, {len(report.province_positions)} provinces "
        f"(net {sum(p.net_fen for p in report.province_positions)} fen), "
        f"captured {report.captured_fen} fen, refunded {report.refunded_fen} fen"
    )


if __name__ == "__main__":
    main()
