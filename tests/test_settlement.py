"""Monthly settlement over generated traffic in four provinces, on its own service instance
(its own database, Redis and clock, set to exact instants around month edges)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from authz_server.domain.settlement import BEIJING, Month, prepaid_fund
from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
    registry_pb2_grpc,
    relationship_pb2,
    relationship_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
)
from authz_server.storage.sql.tables import LedgerEntryRow
from tests import engine_factories as ef
from tests import factories
from tests.harness import ADMIN, APP, Harness, bearer, new_id

# One hospital per province: Beijing, Shanghai, Guangdong (Shenzhen), Sichuan (Chengdu).
REGIONS = {"bj": "110100", "sh": "310100", "gd": "440300", "sc": "510100"}
HOSPITALS = {key: f"hospital-{region}" for key, region in REGIONS.items()}
TOKENS = {f"token-{key}": {"kind": "merchant", "merchant_id": m} for key, m in HOSPITALS.items()}


def beijing(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=BEIJING)  # type: ignore[misc]


class World:
    """The settlement test's own service, stubs and people."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.channel = grpc.insecure_channel(harness.address)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.relationships = relationship_pb2_grpc.RelationshipServiceStub(self.channel)
        self.authorizations = authorization_pb2_grpc.AuthorizationServiceStub(self.channel)
        self.settlement = settlement_pb2_grpc.SettlementServiceStub(self.channel)
        for key, merchant_id in HOSPITALS.items():
            ef.merchant(
                self.registry,
                merchant_id,
                common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION,
                region=REGIONS[key],
            )

    def at(self, moment: datetime) -> None:
        self.harness.clock.set(moment)

    def family(self, holder_key: str, relative_key: str, quota_fen: int) -> tuple[str, str]:
        holder = factories.employee(self.registry, quota_fen * 2, region=REGIONS[holder_key])
        relative = factories.resident(self.registry, region=REGIONS[relative_key])
        relationship_id = factories.active_relationship(
            self.relationships, holder, relative, quota_fen
        )
        return relative, relationship_id

    def pay(self, relative: str, hospital_key: str, amount_fen: int) -> str:
        token = bearer(f"token-{hospital_key}")
        answer = self.authorizations.Authorize(ef.medical(relative, amount_fen), metadata=token)
        assert answer.decision == authorization_pb2.DECISION_APPROVED
        self.authorizations.Capture(
            authorization_pb2.CaptureRequest(
                authorization_id=answer.authorization_id, idempotency_key=new_id("cap")
            ),
            metadata=token,
        )
        return answer.authorization_id

    def refund(self, authorization_id: str, hospital_key: str, amount_fen: int) -> None:
        self.authorizations.Refund(
            authorization_pb2.RefundRequest(
                authorization_id=authorization_id,
                amount_fen=amount_fen,
                idempotency_key=new_id("ref"),
            ),
            metadata=bearer(f"token-{hospital_key}"),
        )

    def close(self, month: str) -> settlement_pb2.CloseMonthResponse:
        return self.settlement.CloseMonth(
            settlement_pb2.CloseMonthRequest(month=month), metadata=ADMIN
        )

    def ledger(self) -> list[LedgerEntryRow]:
        kinds = ("CAPTURE", "REFUND_TO_QUOTA", "REFUND_TO_ACCOUNT")
        return self.harness.app.database.transaction(
            lambda s: list(s.scalars(select(LedgerEntryRow).where(LedgerEntryRow.kind.in_(kinds))))
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    harness = Harness(Path(tmp_path_factory.mktemp("settlement")), extra_tokens=TOKENS)
    built = World(harness)
    yield built
    built.channel.close()
    harness.close()


def expected_from_ledger(rows: list[LedgerEntryRow], month: Month) -> dict[str, dict]:
    """The month's figures recomputed independently from the raw ledger rows."""
    merchants: dict[str, int] = defaultdict(int)
    flows: dict[tuple[str, str], int] = defaultdict(int)
    captured = refunded = 0
    for row in rows:
        moment = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)  # type: ignore[attr-defined]
        if Month.containing(moment) != month:
            continue
        sign = 1 if row.kind == "CAPTURE" else -1
        captured += row.amount_fen if sign > 0 else 0
        refunded += row.amount_fen if sign < 0 else 0
        merchants[row.merchant_id or ""] += sign * row.amount_fen
        flows[(row.holder_region or "", row.merchant_region or "")] += sign * row.amount_fen
    provinces: dict[str, int] = defaultdict(int)
    for (holder_region, merchant_region), net in flows.items():
        if holder_region[:2] != merchant_region[:2]:
            provinces[holder_region[:2]] -= net
            provinces[merchant_region[:2]] += net
    return {
        "totals": {"captured": captured, "refunded": refunded},
        "merchants": dict(merchants),
        "flows": dict(flows),
        "provinces": dict(provinces),
    }


def check_against_ledger(world: World, report: settlement_pb2.SettlementReport) -> None:
    expected = expected_from_ledger(world.ledger(), Month.parse("m", report.month))
    assert (report.captured_fen, report.refunded_fen) == (
        expected["totals"]["captured"],
        expected["totals"]["refunded"],
    )
    assert {p.merchant_id: p.payable_fen for p in report.merchant_payables} == expected["merchants"]
    assert {(f.holder_region, f.merchant_region): f.net_fen for f in report.region_flows} == (
        expected["flows"]
    )
    assert {p.province: p.net_fen for p in report.province_positions} == expected["provinces"]
    assert sum(p.net_fen for p in report.province_positions) == 0
    assert sum(p.payable_fen for p in report.merchant_payables) == (
        report.captured_fen - report.refunded_fen
    )


def test_settlement_over_three_months(world: World) -> None:
    world.at(beijing(2025, 1, 10, 9, 0))
    families = {
        (h, r): world.family(h, r, 500_000) for h in REGIONS for r in REGIONS if h != r or h == "bj"
    }
    # January: each relative pays at the hospital of their own province.
    january = {}
    for (holder_key, relative_key), (relative, _) in families.items():
        amount = 1_000 * (len(january) + 1)
        january[(holder_key, relative_key)] = (world.pay(relative, relative_key, amount), amount)
    # The month's edge in Beijing time: 23:59:59 is January, 00:00:00 is February.
    edge_relative, _ = families[("sh", "gd")]
    world.at(beijing(2025, 1, 31, 23, 59, 59))
    last_of_january = world.pay(edge_relative, "gd", 777)
    world.at(beijing(2025, 2, 1, 0, 0, 0))
    first_of_february = world.pay(edge_relative, "gd", 888)
    # February: a refund of a January capture; a relationship dissolved mid-month.
    world.at(beijing(2025, 2, 14, 10, 0))
    refunded_id, _ = january[("bj", "sc")]
    world.refund(refunded_id, "sc", 500)
    dissolved_relative, dissolved_relationship = families[("sc", "bj")]
    world.pay(dissolved_relative, "bj", 4_321)
    world.relationships.DissolveRelationship(
        relationship_pb2.DissolveRelationshipRequest(
            relationship_id=dissolved_relationship, party=common_pb2.PARTY_HOLDER
        ),
        metadata=APP,
    )
    # March: no traffic at all. April 15th: now.
    world.at(beijing(2025, 4, 15, 12, 0))

    with pytest.raises(grpc.RpcError) as refused:
        world.close("2025-02")
    assert factories.error_info(refused.value).reason == "EARLIER_MONTH_OPEN"
    with pytest.raises(grpc.RpcError) as refused:
        world.close("2025-04")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert factories.error_info(refused.value).reason == "MONTH_NOT_ENDED"

    jan = world.close("2025-01")
    assert not jan.already_closed
    check_against_ledger(world, jan.report)
    assert len({p.province for p in jan.report.province_positions}) == 4
    again = world.close("2025-01")
    assert again.already_closed
    assert again.report.SerializeToString(deterministic=True) == jan.report.SerializeToString(
        deterministic=True
    )

    feb = world.close("2025-02").report
    check_against_ledger(world, feb)
    gd_hospital = {p.merchant_id: p for p in feb.merchant_payables}[HOSPITALS["gd"]]
    assert gd_hospital.captured_fen == 888  # the 00:00:00 capture, not the 23:59:59 one
    assert {p.merchant_id: p for p in jan.report.merchant_payables}[HOSPITALS["gd"]].captured_fen
    sc_hospital = {p.merchant_id: p for p in feb.merchant_payables}[HOSPITALS["sc"]]
    assert (sc_hospital.captured_fen, sc_hospital.refunded_fen) == (0, 500)
    assert sc_hospital.payable_fen == -500  # a January capture refunded in February
    bj_hospital = {p.merchant_id: p for p in feb.merchant_payables}[HOSPITALS["bj"]]
    assert bj_hospital.captured_fen == 4_321  # captured before the dissolution: still owed

    mar = world.close("2025-03").report
    assert (mar.captured_fen, mar.refunded_fen) == (0, 0)
    assert not mar.merchant_payables and not mar.region_flows and not mar.province_positions

    # Prepaid funds: average outflow of the last three closed months x 120 %, rounded up.
    def outflow(report: settlement_pb2.SettlementReport, region: str) -> int:
        return sum(
            f.net_fen
            for f in report.region_flows
            if f.holder_region == region and f.merchant_region != region
        )

    for region in REGIONS.values():
        history = [outflow(r, region) for r in (jan.report, feb, mar)]
        funds = {
            r.month: {f.pooling_region: f for f in r.prepaid_funds} for r in (jan.report, feb, mar)
        }
        for index, report in enumerate((jan.report, feb, mar)):
            fund = funds[report.month][region]
            expected = prepaid_fund(history[: index + 1], 120)
            assert fund.outflow_fen == history[index]
            assert fund.next_month_fen == expected
            previous = (
                funds[(jan.report, feb, mar)[index - 1].month][region].next_month_fen
                if index
                else 0
            )
            assert fund.adjustment_fen == expected - previous
    assert last_of_january and first_of_february


def test_report_of_an_open_month_is_not_found(world: World) -> None:
    with pytest.raises(grpc.RpcError) as missing:
        world.settlement.GetSettlementReport(
            settlement_pb2.GetSettlementReportRequest(month="2031-01"), metadata=ADMIN
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("month", ["", "2025-13", "2025-1", "25-01", "abcd-ef", "1999-12"])
def test_malformed_month_is_invalid_argument(world: World, month: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        world.close(month)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert factories.error_info(refused.value).metadata["field"] == "month"


def test_purge_drops_idempotency_records_of_closed_months_only(world: World) -> None:
    """Runs after the three-month test closed January to March."""
    from authz_server.service.retention import purge_closed_months

    app = world.harness.app
    world.at(beijing(2025, 4, 16, 10, 0))
    relative, _ = world.family("bj", "gd", 100_000)
    token = bearer("token-gd")
    april = world.authorizations.Authorize(ef.medical(relative, 1_000), metadata=token)
    capture = authorization_pb2.CaptureRequest(
        authorization_id=april.authorization_id, idempotency_key="april-capture"
    )
    first = world.authorizations.Capture(capture, metadata=token)

    async def idempotency_keys() -> int:
        """Authorize records (per beneficiary) and their merchant-wide key claims."""
        records = [key async for key in world.harness.client.scan_iter(match="mw:{b:*}:i:*")]
        claims = [key async for key in world.harness.client.scan_iter(match="mw:{k:*}:k:*")]
        return len(records) + len(claims)

    async def authorizations() -> dict[str, tuple[str, int]]:
        """Every authorization hash in Redis: id -> (status, created ms)."""
        found = {}
        async for key in world.harness.client.scan_iter(match="mw:{b:*}:a:*"):
            status, created = await world.harness.client.hmget(key, ["s", "cr"])
            found[key.decode().rsplit(":", 1)[1]] = (status.decode(), int(created))
        return found

    april_starts_ms = int(Month.parse("month", "2025-04").starts_at.timestamp() * 1000)
    held = world.harness.run(authorizations())
    settled_before_april = {
        authorization_id
        for authorization_id, (status, created) in held.items()
        if created < april_starts_ms and status in ("CAPTURED", "VOIDED", "EXPIRED", "DECLINED")
    }
    captured_in_march = next(
        authorization_id
        for authorization_id in settled_before_april
        if held[authorization_id][0] == "CAPTURED"
    )
    march_view = world.authorizations.GetAuthorization(
        authorization_pb2.GetAuthorizationRequest(authorization_id=captured_in_march),
        metadata=merchant_token(world, captured_in_march),
    )
    before = world.harness.run(idempotency_keys())
    purged = world.harness.run(purge_closed_months(app.database, app.pipelined_redis))
    assert purged.through_month == "2025-03"
    assert purged.redis_records == before - 2  # all but April's record and its claim
    assert purged.sql_records > 0
    assert world.harness.run(idempotency_keys()) == 2
    # The closed months' settled authorizations left Redis; everything else stayed.
    assert settled_before_april and purged.redis_authorizations == len(settled_before_april)
    left = world.harness.run(authorizations())
    assert set(left) == set(held) - settled_before_april
    # ...and are still answered, from SQL's journal, as before.
    after_view = world.authorizations.GetAuthorization(
        authorization_pb2.GetAuthorizationRequest(authorization_id=captured_in_march),
        metadata=merchant_token(world, captured_in_march),
    )
    assert after_view.authorization.status == march_view.authorization.status
    assert (
        after_view.authorization.captured_amount_fen == march_view.authorization.captured_amount_fen
    )
    # April is open: its retries still get the original answers.
    again = world.authorizations.Capture(capture, metadata=token)
    assert again.SerializeToString() == first.SerializeToString()
    replay = world.authorizations.Authorize(
        authorization_pb2.AuthorizeRequest(
            idempotency_key=april_key(world, april.authorization_id),
            beneficiary_id=relative,
            purpose=common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET,
            amount_fen=1_000,
        ),
        metadata=token,
    )
    assert replay.authorization_id == april.authorization_id


def merchant_token(world: World, authorization_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata of the merchant that made this authorization (a merchant sees only its own)."""
    from authz_server.storage.sql.tables import AuthorizationRow

    world.harness.run(world.harness.app.journal.flush())
    merchant = world.harness.app.database.transaction(
        lambda s: s.get(AuthorizationRow, authorization_id).merchant_id  # type: ignore[union-attr]
    )
    key = next(key for key, hospital in HOSPITALS.items() if hospital == merchant)
    return bearer(f"token-{key}")


def april_key(world: World, authorization_id: str) -> str:
    from authz_server.storage.sql.tables import AuthorizationRow

    world.harness.run(world.harness.app.journal.flush())
    return world.harness.app.database.transaction(
        lambda s: s.get(AuthorizationRow, authorization_id).idempotency_key  # type: ignore[union-attr]
    )
