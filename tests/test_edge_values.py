"""Values at the edges of what the wire allows, against the session's service: a bad one is
answered INVALID_ARGUMENT naming the field it is wrong in, a good one is served; never INTERNAL.

Found by a helper's input audit; each case failed before its fix:
- AuditService.ListPersonAccess's page token is opaque, but a forged one (base64 of an instant
  whose UTC conversion leaves datetime's range, or a record id outside int64) answered INTERNAL
  with a traceback logged (OverflowError);
- an invalid `end_time` was named `start_time`;
- SettlementService's month took any Unicode digit (`２０２６-01`, full-width) for an ASCII one;
- on PostgreSQL, an Authorize split over many quotas (a beneficiary with ~56 holders of
  service-issued ids, ~27 of 64-character bulk-loaded ids) answered INTERNAL: its funding text
  did not fit the journal's VARCHAR(2000), and its hold stayed in Redis, the beneficiary's
  quotas held for nobody (every retry refused the same way) until the abandoned-hold release
  or the expiry.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from authz_server.generated.medwallet.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    authorization_pb2,
    common_pb2,
    settlement_pb2,
    settlement_pb2_grpc,
)
from tests import engine_factories as ef
from tests import factories
from tests.harness import ADMIN, new_id

NOW = 1_780_000_000  # 2026-05-28, any instant in range
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the largest Timestamp.ToDatetime takes
MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z


def refused_as_invalid(call: Callable[[], Any], field: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
        refused.value.code(),
        refused.value.details(),
    )
    info = factories.error_info(refused.value)
    assert info.reason == "INVALID_ARGUMENT"
    assert info.metadata["field"] == field, dict(info.metadata)


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def _access(channel: grpc.Channel, **fields: Any) -> Callable[[], Any]:
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    values: dict[str, Any] = {
        "person_id": "someone",
        "start_time": Timestamp(seconds=0),
        "end_time": Timestamp(seconds=NOW),
    }
    values.update(fields)
    return lambda: audit.ListPersonAccess(
        audit_pb2.ListPersonAccessRequest(**values), metadata=ADMIN, timeout=10
    )


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("0001-01-01T00:00:00+01:00|1", id="before-year-1-in-utc"),
        pytest.param("9999-12-31T23:59:59-01:00|1", id="after-year-9999-in-utc"),
        pytest.param(f"2026-01-01T00:00:00+00:00|{2**63}", id="record-id-int64-max-plus-1"),
        pytest.param("2026-01-01T00:00:00+00:00|" + "9" * 30, id="record-id-30-digits"),
        pytest.param(f"2026-01-01T00:00:00+00:00|{-(2**63) - 1}", id="record-id-below-int64"),
    ],
)
def test_forged_audit_page_token_is_invalid_argument(channel: grpc.Channel, text: str) -> None:
    refused_as_invalid(_access(channel, page_size=1, page_token=_token(text)), "page_token")


def test_audit_page_token_issued_still_pages(channel: grpc.Channel) -> None:
    """Control: a token of an instant and id in range is taken (an empty page here)."""
    page = _access(channel, page_token=_token("2026-01-01T00:00:00+00:00|12"))()
    assert list(page.records) == [] and page.next_page_token == ""


@pytest.mark.backend_neutral
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(Timestamp(seconds=MAX_SECONDS + 1), id="after-9999"),
        pytest.param(Timestamp(seconds=NOW, nanos=-5), id="negative-nanos"),
        pytest.param(Timestamp(seconds=NOW, nanos=1_000_000_000), id="nanos-a-second"),
    ],
)
@pytest.mark.parametrize("field", ["start_time", "end_time"])
def test_invalid_instant_is_named_by_its_field(
    channel: grpc.Channel, field: str, bad: Timestamp
) -> None:
    refused_as_invalid(_access(channel, **{field: bad}), field)


def test_widest_audit_window_is_served(channel: grpc.Channel) -> None:
    page = _access(
        channel,
        start_time=Timestamp(seconds=MIN_SECONDS),
        end_time=Timestamp(seconds=MAX_SECONDS),
    )()
    assert page.next_page_token == ""


@pytest.mark.backend_neutral
@pytest.mark.parametrize(
    "month",
    [
        # A month not ended (a close is refused, a report not found, if the month were taken):
        # before, nothing was written either way.
        pytest.param("２９９９-12", id="fullwidth-year"),
        pytest.param("٢٩٩٩-12", id="arabic-indic-year"),
        pytest.param("2999-1２", id="fullwidth-month-digit"),
    ],
)
@pytest.mark.parametrize("rpc", ["CloseMonth", "GetSettlementReport"])
def test_month_takes_ascii_digits_only(channel: grpc.Channel, rpc: str, month: str) -> None:
    settlement = settlement_pb2_grpc.SettlementServiceStub(channel)
    request = getattr(settlement_pb2, f"{rpc}Request")(month=month)
    refused_as_invalid(
        lambda: getattr(settlement, rpc)(request, metadata=ADMIN, timeout=10), "month"
    )


# Quotas a split funds: 60 of service-issued ids (32 hex digits) make a funding text of
# 60 x len("<32 hex>=100;") - 1 = 2,219 characters.
SPLIT_QUOTAS = 60


def test_authorize_split_over_many_quotas_is_journaled(
    registry: Any, relationships: Any, authorizations: Any
) -> None:
    """Runs on either database; on SQLite (which does not enforce VARCHAR lengths) it passed
    before the fix too."""
    ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    beneficiary = factories.resident(registry)
    quotas = [
        factories.active_relationship(
            relationships, factories.employee(registry, balance_fen=100), beneficiary, 100
        )
        for _ in range(SPLIT_QUOTAS)
    ]
    request = authorization_pb2.AuthorizeRequest(
        idempotency_key=new_id("split"),
        beneficiary_id=beneficiary,
        purpose=common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET,
        amount_fen=100 * SPLIT_QUOTAS,
    )
    answer = authorizations.Authorize(request, metadata=ef.HOSPITAL_TOKEN, timeout=30)
    assert answer.decision == authorization_pb2.DECISION_APPROVED
    assert [(p.relationship_id, p.amount_fen) for p in answer.funding] == [
        (quota, 100) for quota in quotas
    ]
    assert len(";".join(f"{q}=100" for q in quotas)) > 2000
    # Journaled: answered again by a retry, and captured (SQL pays every part).
    again = authorizations.Authorize(request, metadata=ef.HOSPITAL_TOKEN, timeout=30)
    assert again.authorization_id == answer.authorization_id
    captured = authorizations.Capture(
        authorization_pb2.CaptureRequest(
            authorization_id=answer.authorization_id, idempotency_key=new_id("capture")
        ),
        metadata=ef.HOSPITAL_TOKEN,
        timeout=30,
    )
    assert captured.authorization.status == authorization_pb2.AUTHORIZATION_STATUS_CAPTURED
    assert len(captured.authorization.captured_funding) == SPLIT_QUOTAS
    for quota in quotas:
        shown = factories.relationship(relationships, quota)
        assert (shown.available_fen, shown.held_fen, shown.spent_fen) == (0, 0, 100)
