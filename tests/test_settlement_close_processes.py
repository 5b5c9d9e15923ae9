"""Closes of the same months from several processes at once (operators' CLIs beside the
service's RPC), audit: each month is written once, January before February, every closer
answers the same stored report, and the export matches the stored tables."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select

from authz_server.domain.settlement import BEIJING, Month
from authz_server.service.settlement import SettlementService
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import (
    LedgerEntryRow,
    ParticipantRow,
    SettlementMonthRow,
    SettlementPrepaidFundRow,
    SettlementRegionFlowRow,
)
from tests.harness import drop_database, fresh_database


def test_closes_from_several_processes_write_each_month_once(tmp_path: Path) -> None:
    url = fresh_database(os.environ.get("TEST_DATABASE_URL"), tmp_path)
    database = Database(url, threads=2)
    try:
        now = datetime(2024, 12, 1, tzinfo=UTC)

        def load(session: Any) -> None:
            session.execute(
                insert(ParticipantRow),
                [
                    {
                        "participant_id": "h1", "scheme": "EMPLOYEE", "pooling_region": "110100",
                        "status": "ACTIVE", "balance_fen": 0, "created_at": now,
                        "updated_at": now,
                    }
                ],
            )  # fmt: skip
            rows = []
            for month, fen in ((1, 30_000), (2, 20_001)):
                for i in range(200):
                    rows.append(
                        {
                            "kind": "CAPTURE", "holder_id": "h1", "merchant_id": f"m{i % 7}",
                            "amount_fen": fen, "holder_region": "110100",
                            "merchant_region": "440300",
                            "created_at": datetime(2025, month, 10, tzinfo=BEIJING).astimezone(UTC),
                        }
                    )  # fmt: skip
            session.execute(insert(LedgerEntryRow), rows)

        database.transaction(load)
        environment = dict(os.environ, MEDWALLET_DATA_DIR=str(tmp_path / "data"))
        if url.startswith("postgresql"):
            environment["DATABASE_URL"] = url
        else:
            environment.pop("DATABASE_URL", None)
            (tmp_path / "data").mkdir()
            os.link(url.removeprefix("sqlite:///"), tmp_path / "data" / "medwallet.sqlite3")
            database.close()
            database = Database(f"sqlite:///{tmp_path / 'data' / 'medwallet.sqlite3'}", threads=1)
        processes = []
        for index, month in enumerate(["2025-01", "2025-02", "2025-01", "2025-02", "2025-01"]):
            out = tmp_path / f"out{index}"
            processes.append(
                (
                    month,
                    out,
                    subprocess.Popen(
                        [sys.executable, "-m", "authz_server.cli", "close-month", month,
                         "--export", str(out), "--format", "json"],
                        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )  # fmt: skip
        service = SettlementService(database, 120)
        in_process = asyncio.run(service.close_month(Month(2025, 1)))[0]
        results = []
        for month, out, process in processes:
            stdout, stderr = process.communicate(timeout=120)
            results.append((month, process.returncode, stdout, stderr))
            if process.returncode == 0:
                document = json.loads((out / f"{month}.json").read_text())
                stored = asyncio.run(service.report(Month.parse("m", month)))
                assert document["region_flows"] == [
                    {
                        "holder_region": f.holder_region, "merchant_region": f.merchant_region,
                        "captured_fen": f.captured_fen, "refunded_fen": f.refunded_fen,
                        "net_fen": f.net_fen,
                    }
                    for f in stored.region_flows
                ]  # fmt: skip
                assert document["prepaid_funds"] == [
                    {
                        "pooling_region": f.pooling_region, "outflow_fen": f.outflow_fen,
                        "next_month_fen": f.next_month_fen, "adjustment_fen": f.adjustment_fen,
                    }
                    for f in stored.prepaid_funds
                ]  # fmt: skip
            else:
                assert month == "2025-02" and "EARLIER_MONTH_OPEN" in stderr, results[-1]
        assert all(code == 0 for month, code, _, _ in results if month == "2025-01"), results
        assert in_process.captured_fen == 6_000_000
        if not any(code == 0 for month, code, _, _ in results if month == "2025-02"):
            asyncio.run(service.close_month(Month(2025, 2)))

        def counts(session: Any) -> tuple[Any, ...]:
            return (
                session.scalar(select(func.count()).select_from(SettlementMonthRow)),
                session.scalar(select(func.count()).select_from(SettlementRegionFlowRow)),
                session.execute(
                    select(
                        SettlementPrepaidFundRow.month, SettlementPrepaidFundRow.next_month_fen
                    ).order_by(SettlementPrepaidFundRow.month)
                ).all(),
            )

        months, flows, funds = database.transaction(counts)
        assert (months, flows) == (2, 2)
        # January: ⌈6,000,000 × 1.2⌉; February: ⌈(6,000,000 + 4,000,200) × 120 / 200⌉
        assert [tuple(row) for row in funds] == [("2025-01", 7_200_000), ("2025-02", 6_000_120)]
    finally:
        database.close()
        drop_database(url)
