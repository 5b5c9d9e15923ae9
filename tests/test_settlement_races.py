"""Money that commits around a month's close is settled exactly once. A capture or refund took
its time when its call began and committed a moment later: when the month was closed in between,
its rows were dated in the closed month, whose report never changes, and no later month counted
them (the merchant was never paid). Now the time is read inside the writing transaction, which
takes the settlement lock first (storage/sql/settlement_lock.py); two closes of one month also
take turns. Found by an audit; the first two tests fail on the old code, the last on PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from authz_server.domain.errors import PolicyRefusal
from authz_server.domain.settlement import BEIJING, Month
from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
    registry_pb2_grpc,
    relationship_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
)
from authz_server.service.settlement import SettlementService
from authz_server.storage.sql.tables import LedgerEntryRow
from tests import engine_factories as ef
from tests import factories
from tests.harness import ADMIN, Harness, bearer, new_id

TOKENS = {"token-race-hospital": {"kind": "merchant", "merchant_id": "race-hospital"}}
HOSPITAL = bearer("token-race-hospital")


class World:
    """A server of its own (its clock is moved across month ends), with one hospital and one
    family whose 1,000 fen hold is open on 31 January."""

    def __init__(self, directory: Path) -> None:
        self.harness = Harness(directory, extra_tokens=TOKENS)
        self.channel = grpc.insecure_channel(self.harness.address)
        registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        relationships = relationship_pb2_grpc.RelationshipServiceStub(self.channel)
        self.authorizations = authorization_pb2_grpc.AuthorizationServiceStub(self.channel)
        self.settlement = settlement_pb2_grpc.SettlementServiceStub(self.channel)
        self.at(2025, 1, 10, 9)
        ef.merchant(
            registry, "race-hospital", common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION, region="440300"
        )
        holder = factories.employee(registry, 100_000, region="110100")
        relative = factories.resident(registry, region="440300")
        factories.active_relationship(relationships, holder, relative, 50_000)
        self.at(2025, 1, 31, 20)
        self.hold = self.authorizations.Authorize(ef.medical(relative, 1_000), metadata=HOSPITAL)
        assert self.hold.decision == authorization_pb2.DECISION_APPROVED

    def at(self, *moment: int, microsecond: int = 0) -> None:
        self.harness.clock.set(datetime(*moment, microsecond=microsecond, tzinfo=BEIJING))

    def capture(self) -> None:
        request = authorization_pb2.CaptureRequest(
            authorization_id=self.hold.authorization_id, idempotency_key=new_id("capture")
        )
        self.authorizations.Capture(request, metadata=HOSPITAL)

    def refund(self, fen: int) -> None:
        request = authorization_pb2.RefundRequest(
            authorization_id=self.hold.authorization_id,
            amount_fen=fen,
            idempotency_key=new_id("refund"),
        )
        self.authorizations.Refund(request, metadata=HOSPITAL)

    def in_ledger(self, *kinds: str) -> int:
        def total(session: Any) -> int:
            rows = session.scalars(select(LedgerEntryRow).where(LedgerEntryRow.kind.in_(kinds)))
            return sum(row.amount_fen for row in rows)

        return int(self.harness.app.database.transaction(total))

    def settled(self, *months: str) -> tuple[int, int]:
        """(captured, refunded) over the months' reports, closing those still open."""
        captured = refunded = 0
        for month in months:
            report = self.settlement.CloseMonth(
                settlement_pb2.CloseMonthRequest(month=month), metadata=ADMIN
            ).report
            captured += report.captured_fen
            refunded += report.refunded_fen
        return captured, refunded

    def close(self) -> None:
        self.channel.close()
        self.harness.close()


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    yield world
    world.close()


def test_a_capture_that_commits_after_its_month_closed_is_settled_in_the_next(
    world: World,
) -> None:
    app = world.harness.app
    writer = app.authorizations.captures.writer
    real_submit = writer.submit

    # The closing host's clock runs 30 s ahead of the server's: a close waits that long past
    # the month's end (domain/settlement.py), and the capture must still be within its write
    # deadline (service/ports.py) on the server's.
    ahead = SettlementService(
        app.database, 120, clock=lambda: world.harness.clock() + timedelta(seconds=30)
    )

    async def month_closes_first(unit: Any) -> Any:
        # Claimed at 23:59:59.5 on 31 January; January closes before the batch is written.
        world.at(2025, 2, 1, 0, 0, 1)
        await ahead.close_month(Month(2025, 1))
        return await real_submit(unit)

    writer.submit = month_closes_first  # type: ignore[method-assign]
    world.at(2025, 1, 31, 23, 59, 59, microsecond=500_000)
    try:
        world.capture()
    finally:
        writer.submit = real_submit  # type: ignore[method-assign]
    assert world.in_ledger("CAPTURE") == 1_000
    world.at(2025, 3, 5, 12)
    assert world.settled("2025-01", "2025-02") == (1_000, 0)


def test_a_refund_that_commits_after_its_month_closed_is_settled_in_the_next(
    world: World,
) -> None:
    app = world.harness.app
    world.at(2025, 1, 31, 21)
    world.capture()
    group_commit = app.authorizations.group_commit
    real_submit = group_commit.submit

    async def month_closes_first(work: Any, **options: Any) -> Any:
        # Asked at 23:59:59.5 on 28 February; February closes before the refund is written.
        world.at(2025, 3, 1, 0, 0, 31)
        await app.settlement.close_month(Month(2025, 1))
        await app.settlement.close_month(Month(2025, 2))
        return await real_submit(work, **options)

    group_commit.submit = month_closes_first  # type: ignore[method-assign]
    world.at(2025, 2, 28, 23, 59, 59, microsecond=500_000)
    try:
        world.refund(400)
    finally:
        group_commit.submit = real_submit  # type: ignore[method-assign]
    assert world.in_ledger("REFUND_TO_QUOTA", "REFUND_TO_ACCOUNT") == 400
    world.at(2025, 4, 5, 12)
    assert world.settled("2025-01", "2025-02", "2025-03") == (1_000, 400)


def test_two_closes_of_one_month_at_once_answer_the_same_report(world: World) -> None:
    world.at(2025, 1, 31, 21)
    world.capture()
    world.at(2025, 2, 5, 12)
    service = world.harness.app.settlement

    async def close_twice() -> list[Any]:
        both = [service.close_month(Month(2025, 1)), service.close_month(Month(2025, 1))]
        return list(await asyncio.gather(*both, return_exceptions=True))

    results = world.harness.run(close_twice())
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert world.settled("2025-01") == (1_000, 0)


def test_payments_go_on_while_a_month_is_being_closed(world: World) -> None:
    """The close waits for the writes in flight and then lets them go on: it does not hold
    their lock while it computes (seconds, for a large month), or every capture and refund
    would wait behind it, and a capture waiting past its write deadline would be refused
    (found by an audit). On SQLite every write waits for the close's transaction anyway (one
    writer at a time), so this runs on PostgreSQL."""
    if not world.harness.database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time: a capture waits for any transaction")
    world.at(2025, 2, 1, 10)  # within the hold's 24 hours
    service = world.harness.app.settlement
    real_earliest_open = service._earliest_open
    computing = threading.Event()
    captured = threading.Event()

    def slow_close(session: Any) -> Any:  # called inside the close's transaction
        computing.set()
        captured.wait(20)
        return real_earliest_open(session)

    service._earliest_open = slow_close  # type: ignore[method-assign]
    try:
        closing = asyncio.run_coroutine_threadsafe(
            service.close_month(Month(2025, 1)), world.harness.loop
        )
        assert computing.wait(20)
        world.capture()  # not held up by the close (it would time out if it were)
        captured.set()
        closing.result(30)
    finally:
        captured.set()
        service._earliest_open = real_earliest_open  # type: ignore[method-assign]
    # dated 1 February: settled in February, not in the January being closed
    world.at(2025, 3, 5, 12)
    assert world.settled("2025-01", "2025-02") == (1_000, 0)


def test_a_capture_on_a_worker_that_has_not_seen_its_merchant_yet_keeps_the_region(
    world: World,
) -> None:
    """A worker's merchant cache learns another worker's upsert within ~2 s: a capture in that
    time wrote the merchant's region as "", and the close cleared the money to no province
    (an audit finding). A merchant the cache does not know is read from SQL."""
    app = world.harness.app
    world.at(2025, 1, 31, 21)
    # This worker has not refreshed since another worker took the merchant's upsert.
    app.authorizations.references.merchants.pop("race-hospital")
    world.capture()

    def regions(session: Any) -> list[str | None]:
        rows = session.scalars(select(LedgerEntryRow).where(LedgerEntryRow.kind == "CAPTURE"))
        return [row.merchant_region for row in rows]

    assert app.database.transaction(regions) == ["440300"]
    world.at(2025, 2, 5, 12)
    report = world.settlement.CloseMonth(
        settlement_pb2.CloseMonthRequest(month="2025-01"), metadata=ADMIN
    ).report
    assert {position.province for position in report.province_positions} == {"11", "44"}


def test_a_month_closes_only_once_every_servers_clock_has_left_it(world: World) -> None:
    """A close on a host whose clock ran 2 s ahead of a server's closed January while that
    server still dated its captures in January: they were settled by no month (an audit
    finding). A close now waits 30 s past the month's end (domain/settlement.py)."""
    app = world.harness.app
    ahead = SettlementService(
        app.database, 120, clock=lambda: world.harness.clock() + timedelta(seconds=2)
    )
    # The servers read 23:59:58.5 on 31 January; the closing host reads 00:00:00.5.
    world.at(2025, 1, 31, 23, 59, 58, microsecond=500_000)
    with pytest.raises(PolicyRefusal) as refused:
        world.harness.run(ahead.close_month(Month(2025, 1)))
    assert refused.value.reason == "MONTH_NOT_ENDED"
    world.capture()  # written by a server whose clock still says January
    world.at(2025, 2, 1, 0, 0, 29)  # the closing host: 00:00:31
    _, already = world.harness.run(ahead.close_month(Month(2025, 1)))
    assert not already
    world.at(2025, 3, 5, 12)
    assert world.settled("2025-01", "2025-02") == (1_000, 0)
    assert world.in_ledger("CAPTURE") == 1_000


def test_after_the_first_close_every_month_is_closed_in_turn(world: World) -> None:
    """An empty month skipped made the next month's prepaid fund the average of two months'
    outflow instead of three (×1.5), and its adjustment was taken against a fund never set (an
    audit finding). After the first close, a month closes only once the one before it has,
    traffic or not."""

    def close(month: str) -> settlement_pb2.SettlementReport:
        request = settlement_pb2.CloseMonthRequest(month=month)
        return world.settlement.CloseMonth(request, metadata=ADMIN).report

    world.at(2025, 1, 31, 21)
    world.capture()
    world.at(2025, 2, 5, 12)
    close("2025-01")
    world.at(2025, 4, 5, 12)  # February and March: no traffic at all
    with pytest.raises(grpc.RpcError) as refused:
        close("2025-03")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert factories.error_info(refused.value).reason == "EARLIER_MONTH_OPEN"
    assert "2025-02" in (refused.value.details() or "")
    assert (close("2025-02").captured_fen, close("2025-03").captured_fen) == (0, 0)
