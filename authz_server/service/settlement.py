"""SettlementService: closing a month from the ledger, one SQL statement per table.

Every figure comes from ledger rows of kinds CAPTURE (+) and REFUND_TO_QUOTA /
REFUND_TO_ACCOUNT (−) whose created_at falls in the month (Beijing time). Each table is one
INSERT … SELECT … GROUP BY, so closing a month with millions of ledger rows is one pass per
table and no Python loop over rows; the whole close is one transaction. Closed rows are never
updated: closing again reads them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import DateTime, bindparam, func, select, text
from sqlalchemy.orm import Session

from authz_server.domain.errors import NotFound
from authz_server.domain.settlement import PREPAID_WINDOW_MONTHS, Month, check_closable
from authz_server.domain.types import LedgerKind
from authz_server.service.clock import Clock, system_clock
from authz_server.storage.sql import settlement_lock
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.records import utc
from authz_server.storage.sql.tables import (
    LedgerEntryRow,
    SettlementMerchantPayableRow,
    SettlementMonthRow,
    SettlementPrepaidFundRow,
    SettlementProvincePositionRow,
    SettlementRegionFlowRow,
)

MONEY_KINDS = (
    LedgerKind.CAPTURE.value,
    LedgerKind.REFUND_TO_QUOTA.value,
    LedgerKind.REFUND_TO_ACCOUNT.value,
)
_IN_MONTH = """
    FROM ledger_entries
    WHERE kind IN ('CAPTURE', 'REFUND_TO_QUOTA', 'REFUND_TO_ACCOUNT')
      AND created_at >= :starts_at AND created_at < :ends_at
"""
_CAPTURED = "CAST(SUM(CASE WHEN kind = 'CAPTURE' THEN amount_fen ELSE 0 END) AS BIGINT)"
_REFUNDED = "CAST(SUM(CASE WHEN kind = 'CAPTURE' THEN 0 ELSE amount_fen END) AS BIGINT)"
_NET = "CAST(SUM(CASE WHEN kind = 'CAPTURE' THEN amount_fen ELSE -amount_fen END) AS BIGINT)"

MERCHANT_PAYABLES = f"""
INSERT INTO settlement_merchant_payables
    (month, merchant_id, pooling_region, captured_fen, refunded_fen, payable_fen)
SELECT :month, merchant_id, merchant_region, {_CAPTURED}, {_REFUNDED}, {_NET}
{_IN_MONTH}
GROUP BY merchant_id, merchant_region
"""

REGION_FLOWS = f"""
INSERT INTO settlement_region_flows
    (month, holder_region, merchant_region, captured_fen, refunded_fen, net_fen)
SELECT :month, holder_region, merchant_region, {_CAPTURED}, {_REFUNDED}, {_NET}
{_IN_MONTH}
GROUP BY holder_region, merchant_region
"""

# National clearing: only money crossing provinces; the payer is the holder's province.
PROVINCE_POSITIONS = """
INSERT INTO settlement_province_positions (month, province, pays_fen, receives_fen, net_fen)
SELECT :month, province, CAST(SUM(pays) AS BIGINT), CAST(SUM(receives) AS BIGINT),
       CAST(SUM(receives) - SUM(pays) AS BIGINT)
FROM (
    SELECT SUBSTR(holder_region, 1, 2) AS province, net_fen AS pays, 0 AS receives
    FROM settlement_region_flows
    WHERE month = :month AND SUBSTR(holder_region, 1, 2) <> SUBSTR(merchant_region, 1, 2)
    UNION ALL
    SELECT SUBSTR(merchant_region, 1, 2), 0, net_fen
    FROM settlement_region_flows
    WHERE month = :month AND SUBSTR(holder_region, 1, 2) <> SUBSTR(merchant_region, 1, 2)
) AS crossing
GROUP BY province
"""

# The prepaid fund: ceil(sum of the window's outflows (negative as 0) × percent / (n × 100)),
# n = closed months in the window; the previous months' outflows are their stored rows.
_CLIPPED = "CASE WHEN {0} < 0 THEN 0 ELSE {0} END"
_NEXT = (
    f"(({_CLIPPED.format('COALESCE(o.fen, 0)')} + {_CLIPPED.format('COALESCE(p1.outflow_fen, 0)')}"
    f" + {_CLIPPED.format('COALESCE(p2.outflow_fen, 0)')}) * :percent + :denominator - 1)"
    " / :denominator"
)
PREPAID_FUNDS = f"""
INSERT INTO settlement_prepaid_funds
    (month, pooling_region, outflow_fen, next_month_fen, adjustment_fen)
SELECT :month, r.region, COALESCE(o.fen, 0), {_NEXT}, {_NEXT} - COALESCE(p1.next_month_fen, 0)
FROM (
    SELECT holder_region AS region FROM settlement_region_flows WHERE month = :month
    UNION
    SELECT pooling_region FROM settlement_prepaid_funds WHERE month IN (:previous, :before)
) AS r
LEFT JOIN (
    SELECT holder_region AS region, CAST(SUM(net_fen) AS BIGINT) AS fen
    FROM settlement_region_flows
    WHERE month = :month AND holder_region <> merchant_region
    GROUP BY holder_region
) AS o ON o.region = r.region
LEFT JOIN settlement_prepaid_funds AS p1
    ON p1.month = :previous AND p1.pooling_region = r.region
LEFT JOIN settlement_prepaid_funds AS p2
    ON p2.month = :before AND p2.pooling_region = r.region
"""


@dataclass(frozen=True)
class MerchantPayable:
    merchant_id: str
    pooling_region: str
    captured_fen: int
    refunded_fen: int
    payable_fen: int


@dataclass(frozen=True)
class RegionFlow:
    holder_region: str
    merchant_region: str
    captured_fen: int
    refunded_fen: int
    net_fen: int


@dataclass(frozen=True)
class ProvincePosition:
    province: str
    pays_fen: int
    receives_fen: int
    net_fen: int


@dataclass(frozen=True)
class PrepaidFund:
    pooling_region: str
    outflow_fen: int
    next_month_fen: int
    adjustment_fen: int


@dataclass(frozen=True)
class SettlementReport:
    month: str
    closed_at: datetime
    captured_fen: int
    refunded_fen: int
    merchant_payables: tuple[MerchantPayable, ...]
    region_flows: tuple[RegionFlow, ...]
    province_positions: tuple[ProvincePosition, ...]
    prepaid_funds: tuple[PrepaidFund, ...]


class SettlementService:
    def __init__(
        self, database: Database, safety_percent: int, clock: Clock = system_clock
    ) -> None:
        self.database = database
        self.safety_percent = safety_percent
        self.clock = clock

    async def close_month(self, month: Month) -> tuple[SettlementReport, bool]:
        """Closes the month (or answers its stored report); True when it was closed before."""
        writers_done_at = await self.database.run(self.wait_for_writers)
        return await self.database.run(
            lambda session: self.close_in(session, month, writers_done_at)
        )

    def wait_for_writers(self, session: Session) -> datetime:
        """In a transaction of its own: waits for every capture and refund writing now
        (settlement_lock.py), then answers the time, which decides whether the month has
        ended: a write after it reads a later time."""
        settlement_lock.wait_for_writers(session)
        return self.clock()

    def close_in(
        self, session: Session, month: Month, writers_done_at: datetime
    ) -> tuple[SettlementReport, bool]:
        """The close itself; `writers_done_at` from `wait_for_writers` (close_month; the CLI
        does the same). The month must have ended by then, not merely by now."""
        # One close at a time (PostgreSQL: the row lock below locks nothing while the month's
        # row does not exist yet).
        settlement_lock.for_closing(session)
        if (
            session.get(
                SettlementMonthRow, str(month), with_for_update=True, populate_existing=True
            )
            is not None
        ):
            return self._report(session, month), True
        closed_before = session.scalar(select(SettlementMonthRow.month).limit(1)) is not None
        check_closable(month, writers_done_at, self._earliest_open(session), closed_before)
        times = {"starts_at": month.starts_at, "ends_at": month.ends_at}
        typed = [bindparam(name, type_=DateTime(timezone=True)) for name in times]
        window = [month.previous(), month.previous().previous()]
        closed_in_window = session.scalar(
            select(func.count())
            .select_from(SettlementMonthRow)
            .where(SettlementMonthRow.month.in_([str(m) for m in window]))
        )
        months_in_window = min(PREPAID_WINDOW_MONTHS, 1 + int(closed_in_window or 0))
        names = {"month": str(month), "previous": str(window[0]), "before": str(window[1])}
        for statement in (MERCHANT_PAYABLES, REGION_FLOWS):
            session.execute(text(statement).bindparams(*typed), {**names, **times})
        session.execute(text(PROVINCE_POSITIONS), names)
        session.execute(
            text(PREPAID_FUNDS),
            {**names, "percent": self.safety_percent, "denominator": months_in_window * 100},
        )
        totals = session.execute(
            select(
                func.coalesce(func.sum(SettlementMerchantPayableRow.captured_fen), 0),
                func.coalesce(func.sum(SettlementMerchantPayableRow.refunded_fen), 0),
            ).where(SettlementMerchantPayableRow.month == str(month))
        ).one()
        session.add(
            SettlementMonthRow(
                month=str(month),
                closed_at=self.clock(),
                captured_fen=int(totals[0]),
                refunded_fen=int(totals[1]),
                safety_percent=self.safety_percent,
            )
        )
        session.flush()
        return self._report(session, month), False

    async def report(self, month: Month) -> SettlementReport:
        return await self.database.run(lambda session: self._report(session, month))

    def _earliest_open(self, session: Session) -> Month | None:
        """The earliest month that must close before a later one: after the first close, the
        month after the last closed one, traffic or not (the prepaid funds average over
        calendar months: an empty month skipped would leave its outflow out of the average);
        before it, the earliest month with money movements (None if there is none)."""
        last_closed = session.scalar(select(func.max(SettlementMonthRow.month)))
        if last_closed:
            return Month.parse("month", last_closed).next()
        first = session.scalar(
            select(func.min(LedgerEntryRow.created_at)).where(LedgerEntryRow.kind.in_(MONEY_KINDS))
        )
        return Month.containing(utc(first)) if first is not None else None

    def _report(self, session: Session, month: Month) -> SettlementReport:
        key = str(month)
        head = session.get(SettlementMonthRow, key)
        if head is None:
            raise NotFound(f"month {key} is not closed")

        M, F = SettlementMerchantPayableRow, SettlementRegionFlowRow
        P, R = SettlementProvincePositionRow, SettlementPrepaidFundRow
        merchants = session.scalars(
            select(M).where(M.month == key).order_by(M.merchant_id, M.pooling_region)
        )
        flows = session.scalars(
            select(F).where(F.month == key).order_by(F.holder_region, F.merchant_region)
        )
        provinces = session.scalars(select(P).where(P.month == key).order_by(P.province))
        funds = session.scalars(select(R).where(R.month == key).order_by(R.pooling_region))
        return SettlementReport(
            month=key,
            closed_at=utc(head.closed_at),
            captured_fen=head.captured_fen,
            refunded_fen=head.refunded_fen,
            merchant_payables=tuple(
                MerchantPayable(
                    r.merchant_id, r.pooling_region, r.captured_fen, r.refunded_fen, r.payable_fen
                )
                for r in merchants
            ),
            region_flows=tuple(
                RegionFlow(
                    r.holder_region, r.merchant_region, r.captured_fen, r.refunded_fen, r.net_fen
                )
                for r in flows
            ),
            province_positions=tuple(
                ProvincePosition(r.province, r.pays_fen, r.receives_fen, r.net_fen)
                for r in provinces
            ),
            prepaid_funds=tuple(
                PrepaidFund(r.pooling_region, r.outflow_fen, r.next_month_fen, r.adjustment_fen)
                for r in funds
            ),
        )
