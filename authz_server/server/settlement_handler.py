"""SettlementService handlers (admin principal)."""

from __future__ import annotations

from typing import Any

import grpc

from authz_server.domain.settlement import Month
from authz_server.generated.medwallet.v1 import settlement_pb2, settlement_pb2_grpc
from authz_server.server import convert
from authz_server.server.auth import Authenticator, PrincipalKind
from authz_server.server.errors import mapped
from authz_server.service.settlement import SettlementReport, SettlementService

Context = grpc.aio.ServicerContext[Any, Any]


def report_message(report: SettlementReport) -> settlement_pb2.SettlementReport:
    return settlement_pb2.SettlementReport(
        month=report.month,
        closed_at=convert.timestamp(report.closed_at),
        captured_fen=report.captured_fen,
        refunded_fen=report.refunded_fen,
        merchant_payables=[
            settlement_pb2.MerchantPayable(
                merchant_id=r.merchant_id, pooling_region=r.pooling_region,
                captured_fen=r.captured_fen, refunded_fen=r.refunded_fen,
                payable_fen=r.payable_fen,
            )
            for r in report.merchant_payables
        ],
        region_flows=[
            settlement_pb2.RegionFlow(
                holder_region=r.holder_region, merchant_region=r.merchant_region,
                captured_fen=r.captured_fen, refunded_fen=r.refunded_fen, net_fen=r.net_fen,
            )
            for r in report.region_flows
        ],
        province_positions=[
            settlement_pb2.ProvincePosition(
                province=r.province, pays_fen=r.pays_fen, receives_fen=r.receives_fen,
                net_fen=r.net_fen,
            )
            for r in report.province_positions
        ],
        prepaid_funds=[
            settlement_pb2.PrepaidFund(
                pooling_region=r.pooling_region, outflow_fen=r.outflow_fen,
                next_month_fen=r.next_month_fen, adjustment_fen=r.adjustment_fen,
            )
            for r in report.prepaid_funds
        ],
    )  # fmt: skip


class SettlementHandler(settlement_pb2_grpc.SettlementServiceServicer):
    def __init__(self, service: SettlementService, auth: Authenticator) -> None:
        self.service = service
        self.auth = auth

    @mapped
    async def CloseMonth(
        self, request: settlement_pb2.CloseMonthRequest, context: Context
    ) -> settlement_pb2.CloseMonthResponse:
        self.auth.require(context, PrincipalKind.ADMIN)
        report, already = await self.service.close_month(Month.parse("month", request.month))
        return settlement_pb2.CloseMonthResponse(
            report=report_message(report), already_closed=already
        )

    @mapped
    async def GetSettlementReport(
        self, request: settlement_pb2.GetSettlementReportRequest, context: Context
    ) -> settlement_pb2.GetSettlementReportResponse:
        self.auth.require(context, PrincipalKind.ADMIN)
        report = await self.service.report(Month.parse("month", request.month))
        return settlement_pb2.GetSettlementReportResponse(report=report_message(report))
