"""A merchant whose pooling region changed within a month (UpsertMerchant moved it): its
payables are one row per region, each with the captures made under it, and agree with the
region flows (an audit finding: one row under MAX(region) told one agency to pay what another
received)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from authz_server.domain.settlement import BEIJING
from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
    registry_pb2_grpc,
    relationship_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
)
from tests import engine_factories as ef
from tests import factories
from tests.harness import ADMIN, Harness, bearer, new_id

TOKENS = {"token-moving-hospital": {"kind": "merchant", "merchant_id": "moving-hospital"}}
HOSPITAL = bearer("token-moving-hospital")


@pytest.fixture()
def harness(tmp_path: Path) -> Iterator[Harness]:
    running = Harness(tmp_path, extra_tokens=TOKENS)
    yield running
    running.close()


def at(harness: Harness, *moment: int) -> None:
    harness.clock.set(datetime(*moment, tzinfo=BEIJING))


def test_payables_of_a_merchant_that_changed_region_agree_with_the_region_flows(
    harness: Harness,
) -> None:
    channel = grpc.insecure_channel(harness.address)
    try:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        relationships = relationship_pb2_grpc.RelationshipServiceStub(channel)
        authorizations = authorization_pb2_grpc.AuthorizationServiceStub(channel)
        settlement = settlement_pb2_grpc.SettlementServiceStub(channel)
        kind = common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION

        def pay(beneficiary: str, fen: int) -> None:
            hold = authorizations.Authorize(ef.medical(beneficiary, fen), metadata=HOSPITAL)
            assert hold.decision == authorization_pb2.DECISION_APPROVED
            authorizations.Capture(
                authorization_pb2.CaptureRequest(
                    authorization_id=hold.authorization_id, idempotency_key=new_id("cap")
                ),
                metadata=HOSPITAL,
            )

        at(harness, 2025, 1, 5, 9)
        ef.merchant(registry, "moving-hospital", kind, region="440300")  # Shenzhen
        holder = factories.employee(registry, 100_000, region="110100")  # Beijing
        relative = factories.resident(registry, region="440300")
        factories.active_relationship(relationships, holder, relative, 50_000)
        pay(relative, 1_000)  # captured in Shenzhen

        at(harness, 2025, 1, 20, 9)
        ef.merchant(registry, "moving-hospital", kind, region="310100")  # now Shanghai
        pay(relative, 2_000)  # captured in Shanghai

        at(harness, 2025, 2, 5, 9)
        report = settlement.CloseMonth(
            settlement_pb2.CloseMonthRequest(month="2025-01"), metadata=ADMIN
        ).report

        flows_by_merchant_region: dict[str, int] = defaultdict(int)
        for flow in report.region_flows:
            flows_by_merchant_region[flow.merchant_region] += flow.net_fen
        payables_by_region: dict[str, int] = defaultdict(int)
        for payable in report.merchant_payables:
            payables_by_region[payable.pooling_region] += payable.payable_fen
        # What each region's agency receives through the flows is what it must pay its merchants.
        assert dict(payables_by_region) == dict(flows_by_merchant_region), (
            [(p.merchant_id, p.pooling_region, p.payable_fen) for p in report.merchant_payables],
            dict(flows_by_merchant_region),
        )
        assert [
            (p.merchant_id, p.pooling_region, p.payable_fen) for p in report.merchant_payables
        ] == [("moving-hospital", "310100", 2_000), ("moving-hospital", "440300", 1_000)]
    finally:
        channel.close()
