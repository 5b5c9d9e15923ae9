"""`medwallet-authz close-month` and `settlement-export`: the agencies' files, CSV or JSON."""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

from authz_server.service.settlement import (
    MerchantPayable,
    PrepaidFund,
    ProvincePosition,
    RegionFlow,
    SettlementReport,
)

# Each table of the report and the type of its rows (a CSV's header, also when it has no row:
# a month with local traffic only has no province positions).
TABLES: dict[str, type] = {
    "merchant_payables": MerchantPayable,
    "region_flows": RegionFlow,
    "province_positions": ProvincePosition,
    "prepaid_funds": PrepaidFund,
}


def export(report: SettlementReport, directory: Path, form: str) -> list[Path]:
    """One file per table: <month>-<table>.csv (with a header row) or one <month>.json."""
    directory.mkdir(parents=True, exist_ok=True)
    if form == "json":
        path = directory / f"{report.month}.json"
        document = dataclasses.asdict(report)
        document["closed_at"] = report.closed_at.isoformat()
        path.write_text(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
        return [path]
    written = []
    for table, row_type in TABLES.items():
        rows = getattr(report, table)
        path = directory / f"{report.month}-{table.replace('_', '-')}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([field.name for field in dataclasses.fields(row_type)])
            for row in rows:
                writer.writerow(dataclasses.astuple(row))
        written.append(path)
    return written


def summary(report: SettlementReport, already: bool, seconds: float) -> str:
    net = sum(p.net_fen for p in report.province_positions)
    return (
        f"{report.month} {'was already closed' if already else 'closed'} in {seconds:.2f} s: "
        f"captured {report.captured_fen} fen, refunded {report.refunded_fen} fen, "
        f"{len({p.merchant_id for p in report.merchant_payables})} merchants, "
        f"{len(report.region_flows)} region pairs, "
        f"{len(report.province_positions)} provinces (net {net} fen), "
        f"{len(report.prepaid_funds)} prepaid funds"
    )


def timed() -> float:
    return time.perf_counter()
