"""The month close against an independent recomputation from the raw ledger (audit): random
CAPTURE and REFUND rows placed on month edges (Beijing midnight, a microsecond before it, UTC
midnight, the leap day, December into January), closed in turn on real SQL, every figure
compared, the prepaid funds included, and the export read back against the stored tables."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from authz_server.domain.settlement import BEIJING, Month
from authz_server.runtime import settlement_export
from authz_server.service.settlement import SettlementService
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import LedgerEntryRow, ParticipantRow
from tests.harness import drop_database, fresh_database

REGIONS = ["110100", "110200", "310100", "440300", "440100", "510100"]
MERCHANTS = {f"m-{region}-{i}": region for region in REGIONS for i in range(2)}
PERCENT = 117  # not a round factor: the ceiling shows
FIRST, LAST = Month(2023, 12), Month(2024, 4)  # December into January, the leap February


def stopped_at(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


def months() -> list[Month]:
    found, month = [], FIRST
    while month <= LAST:
        found.append(month)
        month = month.next()
    return found


def moment_in(month: Month, rng: random.Random) -> datetime:
    start, end = month.starts_at, month.ends_at
    choices = [
        start,
        end - timedelta(microseconds=1),
        # UTC midnight of the 1st (08:00 Beijing) and of the month's last day (08:00 too)
        datetime(month.year, month.month, 1, tzinfo=UTC),
        (end - timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0),
        # the Beijing last day's evening: already the next day in no zone, same day in UTC
        end - timedelta(hours=1),
        start + timedelta(seconds=rng.randrange(int((end - start).total_seconds()))),
    ]
    if month == Month(2024, 2):
        choices.append(datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=BEIJING))
    return rng.choice(choices).astimezone(UTC)  # the service writes UTC (service/clock.py)


def expected(rows: list[dict[str, Any]], closed: list[Month]) -> dict[str, dict[str, Any]]:
    by_month: dict[str, dict[str, Any]] = {}
    outflows: dict[str, list[int]] = defaultdict(list)  # region -> per closed month
    funds: dict[str, int] = {}
    seen_regions: set[str] = set()
    for index, month in enumerate(closed):
        merchants: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        flows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for row in rows:
            if Month.containing(row["created_at"]) != month:
                continue
            column = 0 if row["kind"] == "CAPTURE" else 1
            merchants[(row["merchant_id"], row["merchant_region"])][column] += row["amount_fen"]
            flows[(row["holder_region"], row["merchant_region"])][column] += row["amount_fen"]
        provinces: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for (holder, merchant), (c, r) in flows.items():
            if holder[:2] != merchant[:2]:
                provinces[holder[:2]][0] += c - r
                provinces[merchant[:2]][1] += c - r
        regions = {holder for holder, _ in flows} | seen_regions
        seen_regions |= regions
        window = min(3, index + 1)
        fund_rows = {}
        for region in regions:
            out = sum(c - r for (h, m), (c, r) in flows.items() if h == region and m != region)
            series = outflows[region]
            while len(series) < index:
                series.append(0)
            series.append(out)
            last = [max(0, x) for x in series[-window:]]
            numerator = sum(last) * PERCENT
            fund = -(-numerator // (window * 100))
            fund_rows[region] = (out, fund, fund - funds.get(region, 0))
        for region in regions:
            funds[region] = fund_rows[region][1]
        by_month[str(month)] = {
            "merchants": {k: (c, r, c - r) for k, (c, r) in merchants.items()},
            "flows": {k: (c, r, c - r) for k, (c, r) in flows.items()},
            "provinces": {k: (p, q, q - p) for k, (p, q) in provinces.items()},
            "funds": fund_rows,
            "totals": (
                sum(c for c, _ in merchants.values()),
                sum(r for _, r in merchants.values()),
            ),
        }
    return by_month


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_closes_match_the_ledger_on_month_edges(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    url = fresh_database(os.environ.get("TEST_DATABASE_URL"), tmp_path)
    database = Database(url, threads=2)
    try:
        people = {f"h-{region}-{i}": region for region in REGIONS for i in range(2)}
        now = datetime(2023, 11, 1, tzinfo=UTC)
        rows: list[dict[str, Any]] = []
        for month in months():
            for _ in range(rng.randrange(0, 60) if month != Month(2024, 1) else 0):
                holder = rng.choice(sorted(people))
                merchant = rng.choice(sorted(MERCHANTS))
                kind = rng.choice(["CAPTURE"] * 4 + ["REFUND_TO_QUOTA", "REFUND_TO_ACCOUNT"])
                rows.append(
                    {
                        "kind": kind,
                        "holder_id": holder,
                        "merchant_id": merchant,
                        "amount_fen": rng.choice([1, 2, 3, 7, 99, 100, 12_345, 999_999]),
                        "holder_region": people[holder],
                        "merchant_region": MERCHANTS[merchant],
                        "created_at": moment_in(month, rng),
                    }
                )

        def load(session: Any) -> None:
            session.execute(
                insert(ParticipantRow),
                [
                    {
                        "participant_id": p,
                        "scheme": "EMPLOYEE",
                        "pooling_region": region,
                        "status": "ACTIVE",
                        "balance_fen": 0,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for p, region in people.items()
                ],
            )
            session.execute(insert(LedgerEntryRow), rows)

        database.transaction(load)
        closed: list[Month] = []
        want_all = expected(rows, months())
        for month in months():
            clock_at = month.ends_at + timedelta(seconds=31)
            service = SettlementService(database, PERCENT, clock=stopped_at(clock_at))
            report, already = asyncio.run(service.close_month(month))
            assert not already
            closed.append(month)
            want = want_all[str(month)]
            assert (report.captured_fen, report.refunded_fen) == want["totals"], month
            got_merchants = {
                (r.merchant_id, r.pooling_region): (r.captured_fen, r.refunded_fen, r.payable_fen)
                for r in report.merchant_payables
            }
            assert got_merchants == want["merchants"], month
            got_flows = {
                (r.holder_region, r.merchant_region): (r.captured_fen, r.refunded_fen, r.net_fen)
                for r in report.region_flows
            }
            assert got_flows == want["flows"], month
            got_provinces = {
                r.province: (r.pays_fen, r.receives_fen, r.net_fen)
                for r in report.province_positions
            }
            assert got_provinces == want["provinces"], month
            assert sum(r.net_fen for r in report.province_positions) == 0
            got_funds = {
                r.pooling_region: (r.outflow_fen, r.next_month_fen, r.adjustment_fen)
                for r in report.prepaid_funds
            }
            assert got_funds == want["funds"], month
            for value in (
                *got_merchants.values(), *got_flows.values(), *got_provinces.values(),
                *got_funds.values(),
            ):  # fmt: skip
                assert all(type(v) is int for v in value)
            # the export, read back, is the stored tables exactly
            stored = asyncio.run(service.report(month))
            assert stored == report
            folder = tmp_path / "export"
            settlement_export.export(stored, folder, "csv")
            with (folder / f"{month}-prepaid-funds.csv").open() as handle:
                lines = list(csv.reader(handle))
            assert lines[0] == ["pooling_region", "outflow_fen", "next_month_fen", "adjustment_fen"]
            assert {row[0]: tuple(int(x) for x in row[1:]) for row in lines[1:]} == got_funds
            with (folder / f"{month}-merchant-payables.csv").open() as handle:
                lines = list(csv.reader(handle))
            assert {(r[0], r[1]): tuple(int(x) for x in r[2:]) for r in lines[1:]} == (
                got_merchants
            )
            settlement_export.export(stored, folder, "json")
            document = json.loads((folder / f"{month}.json").read_text())
            assert document["captured_fen"] == report.captured_fen
            assert {
                (r["holder_region"], r["merchant_region"]): r["net_fen"]
                for r in document["region_flows"]
            } == {k: v[2] for k, v in got_flows.items()}
    finally:
        database.close()
        drop_database(url)
