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
