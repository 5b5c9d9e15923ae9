"""Captures and refunds committing from many threads while January closes at its very end
(audit): every CAPTURE and REFUND ledger row is in exactly one month's report, January's
report is exactly the ledger rows dated in January, and nothing is counted twice."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from authz_server.domain.errors import PolicyRefusal
from authz_server.domain.settlement import Month
from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    registry_pb2_grpc,
    relationship_pb2_grpc,
    settlement_pb2,
)
from authz_server.service.settlement import SettlementService
from authz_server.storage.sql.tables import LedgerEntryRow
from tests import engine_factories as ef
from tests import factories
from tests.harness import ADMIN, new_id
from tests.test_settlement_races import HOSPITAL, World


@pytest.fixture()
def world(tmp_path: Path) -> Any:
    built = World(tmp_path)
    yield built
    built.close()


def test_writes_racing_the_close_are_each_settled_once(world: World) -> None:
    registry_stub = registry_pb2_grpc.RegistryServiceStub(world.channel)
    relationship_stub = relationship_pb2_grpc.RelationshipServiceStub(world.channel)
    world.at(2025, 1, 31, 19)
    relatives = []
    for region in ("110100", "310100", "440300", "440300"):
        holder = factories.employee(registry_stub, 10_000_000, region=region)
        relative = factories.resident(registry_stub, region="440300")
        factories.active_relationship(relationship_stub, holder, relative, 5_000_000)
        relatives.append(relative)
    world.at(2025, 1, 31, 20)
    holds = []
    for index in range(160):
        answer = world.authorizations.Authorize(
            ef.medical(relatives[index % 4], 100 + index), metadata=HOSPITAL
        )
        assert answer.decision == authorization_pb2.DECISION_APPROVED
        holds.append(answer.authorization_id)

    def capture(authorization_id: str) -> None:
        world.authorizations.Capture(
            authorization_pb2.CaptureRequest(
                authorization_id=authorization_id, idempotency_key=new_id("cap")
            ),
            metadata=HOSPITAL,
        )

    def refund(authorization_id: str, fen: int) -> None:
        world.authorizations.Refund(
            authorization_pb2.RefundRequest(
                authorization_id=authorization_id, amount_fen=fen, idempotency_key=new_id("ref")
            ),
            metadata=HOSPITAL,
        )

    world.at(2025, 1, 31, 21)
    early, late = holds[:60], holds[60:]
    for authorization_id in early:
        capture(authorization_id)

    app = world.harness.app
    closer = SettlementService(
        app.database, 120, clock=lambda: world.harness.clock() + timedelta(seconds=30)
    )
    closed = threading.Event()
    tries = []

    def close_january() -> None:
        while True:
            try:
                world.harness.run(closer.close_month(Month(2025, 1)))
                closed.set()
                return
            except PolicyRefusal as refusal:
                assert refusal.reason == "MONTH_NOT_ENDED"
                tries.append(1)
                time.sleep(0.01)

    failures: list[BaseException] = []

    def guarded(work: Any, *args: Any) -> None:
        try:
            work(*args)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                failures.append(error)

    # 1.5 s before midnight Beijing time; the writes go on for ~3 s of real time
    world.at(2025, 1, 31, 23, 59, 58, microsecond=500_000)
    with ThreadPoolExecutor(max_workers=9) as pool:
        closing = pool.submit(close_january)
        jobs = []
        for index in range(100):
            jobs.append(pool.submit(guarded, capture, late[index]))
            if index < 60:
                jobs.append(pool.submit(guarded, refund, early[index], 7 + index))
                jobs.append(pool.submit(guarded, refund, early[index], 3))
            time.sleep(0.03)
        for job in jobs:
            job.result(60)
        closing.result(60)
    assert not failures, failures[:3]
    assert tries, "the close never had to wait for the month's end"

    def ledger(session: Any) -> list[tuple[str, int, Any]]:
        kinds = ("CAPTURE", "REFUND_TO_QUOTA", "REFUND_TO_ACCOUNT")
        rows = session.scalars(select(LedgerEntryRow).where(LedgerEntryRow.kind.in_(kinds)))
        return [(r.kind, r.amount_fen, r.created_at) for r in rows]

    rows = app.database.transaction(ledger)
    january = Month(2025, 1)

    def in_jan(moment: Any) -> bool:
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return Month.containing(moment) == january

    jan_captured = sum(f for k, f, at in rows if k == "CAPTURE" and in_jan(at))
    jan_refunded = sum(f for k, f, at in rows if k != "CAPTURE" and in_jan(at))
    all_captured = sum(f for k, f, _ in rows if k == "CAPTURE")
    all_refunded = sum(f for k, f, _ in rows if k != "CAPTURE")
    assert jan_captured < all_captured, "no capture landed after the month"
    world.at(2025, 3, 5, 12)
    reports = [
        world.settlement.CloseMonth(
            settlement_pb2.CloseMonthRequest(month=m), metadata=ADMIN
        ).report
        for m in ("2025-01", "2025-02")
    ]
    assert (reports[0].captured_fen, reports[0].refunded_fen) == (jan_captured, jan_refunded)
    assert sum(r.captured_fen for r in reports) == all_captured
    assert sum(r.refunded_fen for r in reports) == all_refunded
