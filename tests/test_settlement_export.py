"""`settlement-export --format csv` (runtime/settlement_export.py): every table's file starts
with its header, also when the table has no row (a month without cross-province money has no
province positions). Its header was taken from its first row, so such a file held one empty
line (an audit finding): the agencies' importers cannot tell that from a broken file."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

from authz_server.runtime import settlement_export
from authz_server.service.settlement import (
    MerchantPayable,
    PrepaidFund,
    RegionFlow,
    SettlementReport,
)


def test_csv_of_an_empty_table_still_has_its_header(tmp_path: Path) -> None:
    # Only local money (as close_month stores it): one merchant, one region pair, no province
    # crossing, so the province table has no row.
    report = SettlementReport(
        month="2025-03",
        closed_at=datetime(2025, 4, 1, tzinfo=UTC),
        captured_fen=1_000,
        refunded_fen=0,
        merchant_payables=(MerchantPayable("m1", "110100", 1_000, 0, 1_000),),
        region_flows=(RegionFlow("110100", "110100", 1_000, 0, 1_000),),
        province_positions=(),
        prepaid_funds=(PrepaidFund("110100", 0, 0, 0),),
    )
    paths = settlement_export.export(report, tmp_path, "csv")
    headers = {}
    for path in paths:
        with path.open(newline="") as handle:
            headers[path.name] = next(csv.reader(handle), [])
    assert headers["2025-03-merchant-payables.csv"][0] == "merchant_id"
    assert headers["2025-03-province-positions.csv"] == [
        "province",
        "pays_fen",
        "receives_fen",
        "net_fen",
    ], headers


def test_close_month_refuses_an_export_path_that_is_a_file_before_closing(tmp_path: Path) -> None:
    """Pointed at a file, close-month closed the month and then failed with a traceback (an
    audit note): it is refused before the close now, and the month stays open."""
    import os
    import subprocess
    import sys

    environment = dict(os.environ, MEDWALLET_DATA_DIR=str(tmp_path / "data"))
    environment.pop("DATABASE_URL", None)

    def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "authz_server.cli", *arguments],
            env=environment, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    refused = cli("close-month", "2025-01", "--export", str(a_file))
    assert refused.returncode == 2 and "is not a folder" in refused.stderr, refused.stderr
    still_open = cli("settlement-export", "2025-01", "--to", str(tmp_path / "out"))
    assert still_open.returncode != 0 and "not closed" in still_open.stderr, still_open.stderr
    closed = cli("close-month", "2025-01", "--export", str(tmp_path / "out"))
    assert closed.returncode == 0, closed.stderr
    assert "2025-01 closed" in closed.stdout
    with (tmp_path / "out" / "2025-01-province-positions.csv").open(newline="") as handle:
        assert next(csv.reader(handle))[0] == "province"
