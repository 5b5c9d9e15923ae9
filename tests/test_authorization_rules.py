"""The authorization engine's rules (issue 3), each with an allowed and a refused case, through
the real gRPC API: who may act, purpose and merchant, pharmacy lines, premiums, hold expiry,
resolving once, refunds, funding choice and dissolution with open holds.

Every test checks the figures of every relationship it touched afterwards, and the conservation
rule allocated = available + held + spent on each (see `figures`).

The helpers here are shared with test_authorization_idempotency.py and
test_authorization_recovery.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from authz_server.domain.errors import Unavailable
from authz_server.generated.medwallet.v1 import (
    authorization_pb2 as pb,
)
from authz_server.generated.medwallet.v1 import (
    common_pb2,
    registry_pb2,
    relationship_pb2,
)
from tests import engine_factories as ef
from tests import factories
from tests.harness import ADMIN, APP, Harness, bearer, new_id

Metadata = tuple[tuple[str, str], ...]

HOSPITAL = bearer("test-rules-hospital")
HOSPITAL_2 = bearer("test-rules-hospital-2")
PHARMACY = bearer("test-rules-pharmacy")
COLLECTOR = bearer("test-rules-collector")
UNDESIGNATED = bearer("test-rules-undesignated")
UNREGISTERED = bearer("test-rules-unregistered")  # a merchant token without a registry entry

MEDICAL = common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET
PHARMACY_PURPOSE = common_pb2.PURPOSE_PHARMACY
RESIDENT_PREMIUM = common_pb2.PURPOSE_RESIDENT_PREMIUM
LTC_PREMIUM = common_pb2.PURPOSE_LTC_PREMIUM

APPROVED = pb.DECISION_APPROVED
PARTIAL = pb.DECISION_PARTIALLY_APPROVED
DECLINED = pb.DECISION_DECLINED
PENDING = pb.AUTHORIZATION_STATUS_PENDING
CAPTURED = pb.AUTHORIZATION_STATUS_CAPTURED
VOIDED = pb.AUTHORIZATION_STATUS_VOIDED
EXPIRED = pb.AUTHORIZATION_STATUS_EXPIRED

PHARMACY_HOLD_MS = 900_000
MEDICAL_HOLD_MS = 86_400_000

MERCHANTS = {
    "rules-hospital": (common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION, True),
    "rules-hospital-2": (common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION, True),
    "rules-pharmacy": (common_pb2.MERCHANT_KIND_RETAIL_PHARMACY, True),
    "rules-collector": (common_pb2.MERCHANT_KIND_PREMIUM_COLLECTOR, True),
    "rules-undesignated": (common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION, False),
}


def register_merchants(registry: Any) -> None:
    for merchant_id, (kind, designated) in MERCHANTS.items():
        ef.merchant(registry, merchant_id, kind, designated=designated)


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


# --- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    beneficiary_id: str
    holder_ids: list[str]
    relationship_ids: list[str]


def family(
    registry: Any, relationships: Any, *quotas: int, resident: bool = True, spare: int = 100_000
) -> Family:
    """A beneficiary with one relationship per quota (oldest first), each from its own holder
    who keeps `spare` fen in the personal account."""
    beneficiary = factories.resident(registry) if resident else factories.employee(registry)
    holders, relationship_ids = [], []
    for quota in quotas:
        holder = factories.employee(registry, balance_fen=quota + spare)
        relationship_ids.append(
            factories.active_relationship(relationships, holder, beneficiary, quota)
        )
        holders.append(holder)
    return Family(beneficiary, holders, relationship_ids)


def figures(relationships: Any, relationship_id: str) -> tuple[int, int, int]:
    """(available, held, spent) of a relationship, after checking conservation on it."""
    shown = factories.relationship(relationships, relationship_id)
    assert shown.allocated_fen == shown.available_fen + shown.held_fen + shown.spent_fen, shown
    return shown.available_fen, shown.held_fen, shown.spent_fen


def all_figures(relationships: Any, relationship_ids: Sequence[str]) -> list[tuple[int, int, int]]:
    return [figures(relationships, relationship_id) for relationship_id in relationship_ids]


def authorize_request(
    beneficiary_id: str, purpose: int, amount_fen: int, **fields: Any
) -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(
        idempotency_key=fields.pop("idempotency_key", new_id("auth")),
        beneficiary_id=beneficiary_id,
        purpose=purpose,  # type: ignore[arg-type]
        amount_fen=amount_fen,
        **fields,
    )


def authorize(
    authorizations: Any,
    token: Metadata,
    beneficiary_id: str,
    purpose: int,
    amount_fen: int,
    **fields: Any,
) -> pb.AuthorizeResponse:
    request = authorize_request(beneficiary_id, purpose, amount_fen, **fields)
    answer: pb.AuthorizeResponse = authorizations.Authorize(request, metadata=token)
    return answer


def capture(
    authorizations: Any, token: Metadata, authorization_id: str, amount_fen: int = 0, key: str = ""
) -> pb.Authorization:
    answer = authorizations.Capture(
        pb.CaptureRequest(
            authorization_id=authorization_id,
            amount_fen=amount_fen,
            idempotency_key=key or new_id("capture"),
        ),
        metadata=token,
    )
    result: pb.Authorization = answer.authorization
    return result


def void(authorizations: Any, token: Metadata, authorization_id: str) -> pb.Authorization:
    answer = authorizations.Void(pb.VoidRequest(authorization_id=authorization_id), metadata=token)
    result: pb.Authorization = answer.authorization
    return result


def refund(
    authorizations: Any, token: Metadata, authorization_id: str, amount_fen: int, key: str = ""
) -> pb.RefundResponse:
    answer: pb.RefundResponse = authorizations.Refund(
        pb.RefundRequest(
            authorization_id=authorization_id,
            amount_fen=amount_fen,
            idempotency_key=key or new_id("refund"),
        ),
        metadata=token,
    )
    return answer


def get(authorizations: Any, token: Metadata, authorization_id: str) -> pb.Authorization:
    answer = authorizations.GetAuthorization(
        pb.GetAuthorizationRequest(authorization_id=authorization_id), metadata=token
    )
    result: pb.Authorization = answer.authorization
    return result


def refused(
    call: Callable[[], Any], code: grpc.StatusCode, reason: str, field: str | None = None
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, error.details()
    info = factories.error_info(error)
    assert info.reason == reason, (info, error.details())
    if field is not None:
        assert info.metadata["field"] == field, info
    return error


def line(item_code: str, amount_fen: int, quantity: int = 1) -> pb.AuthorizationLine:
    return pb.AuthorizationLine(item_code=item_code, quantity=quantity, amount_fen=amount_fen)


def line_results(answer: pb.AuthorizeResponse) -> list[tuple[str, bool, int, int]]:
    return [
        (result.item_code, result.approved, result.decline_reason, result.approved_amount_fen)
        for result in answer.line_results
    ]


def funding(parts: Sequence[pb.FundingPart]) -> list[tuple[str, int]]:
    return [(part.relationship_id, part.amount_fen) for part in parts]


def assert_declined(answer: pb.AuthorizeResponse, reason: int, remaining_fen: int) -> None:
    assert answer.decision == DECLINED, answer
    assert answer.decline_reason == reason, answer
    assert answer.approved_amount_fen == 0
    assert not answer.funding
    assert answer.remaining_quota_fen == remaining_fen
    assert answer.status == pb.AUTHORIZATION_STATUS_DECLINED
    assert not answer.HasField("expires_at")
    assert all(not result.approved for result in answer.line_results)


def dissolve(relationships: Any, relationship_id: str) -> int:
    returned: int = relationships.DissolveRelationship(
        relationship_pb2.DissolveRelationshipRequest(
            relationship_id=relationship_id, party=common_pb2.PARTY_HOLDER
        ),
        metadata=APP,
    ).returned_fen
    return returned


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- merchant principal ----------------------------------------------------------------------


def test_a_merchant_acts_only_on_its_own_authorizations(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    assert held.decision == APPROVED
    other = held.authorization_id

    for call in (
        lambda: capture(authorizations, HOSPITAL_2, other),
        lambda: void(authorizations, HOSPITAL_2, other),
        lambda: refund(authorizations, HOSPITAL_2, other, 1_000),
        lambda: get(authorizations, HOSPITAL_2, other),
    ):
        refused(call, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert figures(relationships, rid) == (40_000, 10_000, 0)

    # The owner may: and after the capture, the other merchant still cannot refund or read it.
    assert get(authorizations, HOSPITAL, other).status == PENDING
    assert capture(authorizations, HOSPITAL, other).captured_amount_fen == 10_000
    refused(
        lambda: refund(authorizations, HOSPITAL_2, other, 1_000),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    refused(lambda: get(authorizations, HOSPITAL_2, other), grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert figures(relationships, rid) == (40_000, 0, 10_000)
    # An id nobody issued is NOT_FOUND too.
    refused(lambda: get(authorizations, HOSPITAL, "0" * 32), grpc.StatusCode.NOT_FOUND, "NOT_FOUND")


def test_only_a_merchant_token_may_call_the_engine(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    identifier = held.authorization_id
    for token in (ADMIN, APP):
        calls: list[Callable[[Metadata], Any]] = [
            lambda t: authorize(authorizations, t, fam.beneficiary_id, MEDICAL, 1_000),
            lambda t: capture(authorizations, t, identifier),
            lambda t: void(authorizations, t, identifier),
            lambda t: refund(authorizations, t, identifier, 1_000),
            lambda t: get(authorizations, t, identifier),
        ]
        for call in calls:
            refused(
                lambda call=call, token=token: call(token),
                grpc.StatusCode.PERMISSION_DENIED,
                "PERMISSION_DENIED",
            )
    refused(
        lambda: get(authorizations, bearer("no-such-token"), identifier),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )
    assert figures(relationships, rid) == (40_000, 10_000, 0)
    assert get(authorizations, HOSPITAL, identifier).status == PENDING


# --- purpose and merchant --------------------------------------------------------------------

PHARMACY_LINE_AMOUNT = 2_000


@pytest.mark.parametrize(
    ("purpose", "allowed", "refused_at"),
    [
        (MEDICAL, HOSPITAL, [PHARMACY, COLLECTOR]),
        (PHARMACY_PURPOSE, PHARMACY, [HOSPITAL, COLLECTOR]),
        (RESIDENT_PREMIUM, COLLECTOR, [HOSPITAL, PHARMACY]),
        (LTC_PREMIUM, COLLECTOR, [HOSPITAL, PHARMACY]),
    ],
    ids=["medical", "pharmacy", "resident-premium", "ltc-premium"],
)
def test_each_purpose_only_at_its_kind_of_merchant(
    registry, relationships, authorizations, purpose, allowed, refused_at
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    codes = ef.items(registry)
    fields: dict[str, Any] = {}
    if purpose == PHARMACY_PURPOSE:
        fields["lines"] = [line(codes["drug"], PHARMACY_LINE_AMOUNT)]
    amount = PHARMACY_LINE_AMOUNT

    for token in [*refused_at, UNDESIGNATED, UNREGISTERED]:
        answer = authorize(authorizations, token, fam.beneficiary_id, purpose, amount, **fields)
        reason = (
            pb.DECLINE_REASON_PURPOSE_NOT_ALLOWED
            if token in refused_at
            else pb.DECLINE_REASON_MERCHANT_NOT_DESIGNATED
        )
        # The merchant may draw on no quota for this: nothing to report as remaining.
        assert_declined(answer, reason, 0)
        assert [(r.approved, r.decline_reason) for r in answer.line_results] == [
            (False, reason) for _ in fields.get("lines", [])
        ]
        assert figures(relationships, rid) == (50_000, 0, 0)

    answer = authorize(authorizations, allowed, fam.beneficiary_id, purpose, amount, **fields)
    assert answer.decision == APPROVED
    assert answer.decline_reason == pb.DECLINE_REASON_UNSPECIFIED
    assert answer.approved_amount_fen == amount
    assert funding(answer.funding) == [(rid, amount)]
    assert answer.remaining_quota_fen == 50_000 - amount
    if purpose in (RESIDENT_PREMIUM, LTC_PREMIUM):
        assert answer.status == CAPTURED
        assert figures(relationships, rid) == (50_000 - amount, 0, amount)
    else:
        assert answer.status == PENDING
        assert figures(relationships, rid) == (50_000 - amount, amount, 0)


# --- pharmacy lines --------------------------------------------------------------------------


def test_pharmacy_pays_eligible_drugs_devices_and_consumables(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    codes = ef.items(registry)
    lines = [
        line(codes["drug"], 3_000, 2),
        line(codes["device"], 2_000),
        line(codes["consumable"], 1_500),
    ]
    answer = authorize(
        authorizations, PHARMACY, fam.beneficiary_id, PHARMACY_PURPOSE, 6_500, lines=lines
    )
    assert answer.decision == APPROVED
    assert answer.approved_amount_fen == 6_500
    assert line_results(answer) == [
        (codes["drug"], True, 0, 3_000),
        (codes["device"], True, 0, 2_000),
        (codes["consumable"], True, 0, 1_500),
    ]
    assert funding(answer.funding) == [(rid, 6_500)]
    assert answer.remaining_quota_fen == 43_500
    assert answer.status == PENDING
    assert figures(relationships, rid) == (43_500, 6_500, 0)


def test_ineligible_lines_are_never_paid(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    codes = ef.items(registry)
    unknown = new_id("unknown")
    basket = [
        line(codes["drug"], 3_000),
        line(codes["cosmetic"], 1_000),  # marked not eligible
        line(codes["device"], 2_000),
        line(codes["service"], 500),  # a medical service: not a pharmacy category
        line(unknown, 700),  # not in the catalog
    ]
    total = 7_200
    NOT_ELIGIBLE = pb.DECLINE_REASON_ITEM_NOT_ELIGIBLE

    # Without allow_partial the basket is declined: nothing is held.
    answer = authorize(
        authorizations, PHARMACY, fam.beneficiary_id, PHARMACY_PURPOSE, total, lines=basket
    )
    assert_declined(answer, NOT_ELIGIBLE, 50_000)
    for result in answer.line_results:
        if result.item_code in (codes["cosmetic"], codes["service"], unknown):
            assert result.decline_reason == NOT_ELIGIBLE
    assert figures(relationships, rid) == (50_000, 0, 0)

    # With allow_partial the eligible part is paid, the rest never.
    answer = authorize(
        authorizations,
        PHARMACY,
        fam.beneficiary_id,
        PHARMACY_PURPOSE,
        total,
        lines=basket,
        allow_partial=True,
    )
    assert answer.decision == PARTIAL
    assert answer.decline_reason == pb.DECLINE_REASON_UNSPECIFIED
    assert answer.approved_amount_fen == 5_000
    assert line_results(answer) == [
        (codes["drug"], True, 0, 3_000),
        (codes["cosmetic"], False, NOT_ELIGIBLE, 0),
        (codes["device"], True, 0, 2_000),
        (codes["service"], False, NOT_ELIGIBLE, 0),
        (unknown, False, NOT_ELIGIBLE, 0),
    ]
    assert funding(answer.funding) == [(rid, 5_000)]
    assert answer.remaining_quota_fen == 45_000
    assert figures(relationships, rid) == (45_000, 5_000, 0)

    # Only ineligible lines: declined even with allow_partial.
    answer = authorize(
        authorizations,
        PHARMACY,
        fam.beneficiary_id,
        PHARMACY_PURPOSE,
        1_500,
        lines=[line(codes["cosmetic"], 1_000), line(codes["service"], 500)],
        allow_partial=True,
    )
    assert_declined(answer, NOT_ELIGIBLE, 45_000)
    assert [r.decline_reason for r in answer.line_results] == [NOT_ELIGIBLE, NOT_ELIGIBLE]
    assert figures(relationships, rid) == (45_000, 5_000, 0)


def test_pharmacy_partial_approval_pays_up_to_the_quota(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 4_000)
    [rid] = fam.relationship_ids
    codes = ef.items(registry)
    basket = [
        line(codes["drug"], 3_000),
        line(codes["cosmetic"], 1_000),
        line(codes["device"], 2_000),
        line(codes["consumable"], 1_500),
    ]
    # Without allow_partial: short of the full amount is a decline, nothing held.
    eligible_only = [basket[0], basket[2], basket[3]]
    answer = authorize(
        authorizations, PHARMACY, fam.beneficiary_id, PHARMACY_PURPOSE, 6_500, lines=eligible_only
    )
    assert_declined(answer, pb.DECLINE_REASON_INSUFFICIENT_QUOTA, 4_000)
    assert figures(relationships, rid) == (4_000, 0, 0)

    # With it: the eligible lines in order, as far as the quota goes.
    answer = authorize(
        authorizations,
        PHARMACY,
        fam.beneficiary_id,
        PHARMACY_PURPOSE,
        7_500,
        lines=basket,
        allow_partial=True,
    )
    assert answer.decision == PARTIAL
    assert answer.approved_amount_fen == 4_000
    assert line_results(answer) == [
        (codes["drug"], True, 0, 3_000),
        (codes["cosmetic"], False, pb.DECLINE_REASON_ITEM_NOT_ELIGIBLE, 0),
        (codes["device"], True, 0, 1_000),
        (codes["consumable"], False, pb.DECLINE_REASON_INSUFFICIENT_QUOTA, 0),
    ]
    assert funding(answer.funding) == [(rid, 4_000)]
    assert answer.remaining_quota_fen == 0
    assert figures(relationships, rid) == (0, 4_000, 0)

    # An empty quota approves nothing, partial or not.
    answer = authorize(
        authorizations,
        PHARMACY,
        fam.beneficiary_id,
        PHARMACY_PURPOSE,
        3_000,
        lines=[basket[0]],
        allow_partial=True,
    )
    assert_declined(answer, pb.DECLINE_REASON_INSUFFICIENT_QUOTA, 0)
    assert figures(relationships, rid) == (0, 4_000, 0)


def test_pharmacy_request_shape(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    codes = ef.items(registry)
    refused(
        lambda: authorize(authorizations, PHARMACY, fam.beneficiary_id, PHARMACY_PURPOSE, 1_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        field="lines",
    )
    refused(
        lambda: authorize(
            authorizations,
            PHARMACY,
            fam.beneficiary_id,
            PHARMACY_PURPOSE,
            5_001,
            lines=[line(codes["drug"], 3_000), line(codes["device"], 2_000)],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        field="amount_fen",
    )
    # Lines on a medical bill must add up too.
    refused(
        lambda: authorize(
            authorizations,
            HOSPITAL,
            fam.beneficiary_id,
            MEDICAL,
            4_999,
            lines=[line("ward-day", 5_000)],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        field="amount_fen",
    )
    assert figures(relationships, rid) == (50_000, 0, 0)
    answer = authorize(
        authorizations,
        PHARMACY,
        fam.beneficiary_id,
        PHARMACY_PURPOSE,
        5_000,
        lines=[line(codes["drug"], 3_000), line(codes["device"], 2_000)],
    )
    assert answer.decision == APPROVED
    assert figures(relationships, rid) == (45_000, 5_000, 0)


# --- premiums --------------------------------------------------------------------------------


def test_resident_premium_only_for_a_resident_and_captured_at_once(
    registry, relationships, authorizations
) -> None:
    resident = family(registry, relationships, 50_000)
    employee = family(registry, relationships, 50_000, resident=False)
    [resident_rid] = resident.relationship_ids
    [employee_rid] = employee.relationship_ids

    answer = authorize(authorizations, COLLECTOR, employee.beneficiary_id, RESIDENT_PREMIUM, 38_000)
    assert_declined(answer, pb.DECLINE_REASON_BENEFICIARY_NOT_ELIGIBLE, 50_000)
    assert figures(relationships, employee_rid) == (50_000, 0, 0)

    answer = authorize(authorizations, COLLECTOR, resident.beneficiary_id, RESIDENT_PREMIUM, 38_000)
    assert answer.decision == APPROVED
    assert answer.status == CAPTURED
    assert answer.approved_amount_fen == 38_000
    assert funding(answer.funding) == [(resident_rid, 38_000)]
    assert answer.remaining_quota_fen == 12_000
    assert figures(relationships, resident_rid) == (12_000, 0, 38_000)
    shown = get(authorizations, COLLECTOR, answer.authorization_id)
    assert (shown.status, shown.approved_amount_fen, shown.captured_amount_fen) == (
        CAPTURED,
        38_000,
        38_000,
    )
    # Already captured: a capture or a void of it is refused.
    refused(
        lambda: capture(authorizations, COLLECTOR, answer.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )
    refused(
        lambda: void(authorizations, COLLECTOR, answer.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )
    assert figures(relationships, resident_rid) == (12_000, 0, 38_000)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "employee"])
def test_ltc_premium_for_either_scheme(registry, relationships, authorizations, resident) -> None:
    fam = family(registry, relationships, 20_000, resident=resident)
    [rid] = fam.relationship_ids
    answer = authorize(authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000)
    assert (answer.decision, answer.status, answer.approved_amount_fen) == (
        APPROVED,
        CAPTURED,
        15_000,
    )
    assert answer.remaining_quota_fen == 5_000
    assert figures(relationships, rid) == (5_000, 0, 15_000)
    # In full or not at all: 5,000 left is not enough for the next 15,000.
    answer = authorize(authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000)
    assert_declined(answer, pb.DECLINE_REASON_INSUFFICIENT_QUOTA, 5_000)
    assert figures(relationships, rid) == (5_000, 0, 15_000)


def test_premium_is_full_or_nothing(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 30_000)
    [rid] = fam.relationship_ids
    for purpose in (RESIDENT_PREMIUM, LTC_PREMIUM):
        refused(
            lambda purpose=purpose: authorize(
                authorizations, COLLECTOR, fam.beneficiary_id, purpose, 10_000, allow_partial=True
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            field="allow_partial",
        )
        answer = authorize(authorizations, COLLECTOR, fam.beneficiary_id, purpose, 30_001)
        assert_declined(answer, pb.DECLINE_REASON_INSUFFICIENT_QUOTA, 30_000)
        assert figures(relationships, rid) == (30_000, 0, 0)
    answer = authorize(authorizations, COLLECTOR, fam.beneficiary_id, RESIDENT_PREMIUM, 30_000)
    assert (answer.decision, answer.status, answer.remaining_quota_fen) == (APPROVED, CAPTURED, 0)
    assert figures(relationships, rid) == (0, 0, 30_000)


# --- hold expiry -----------------------------------------------------------------------------


def test_pharmacy_hold_expires_after_15_minutes(
    harness: Harness, registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    codes = ef.items(registry)

    def pharmacy(amount: int) -> pb.AuthorizeResponse:
        return authorize(
            authorizations,
            PHARMACY,
            fam.beneficiary_id,
            PHARMACY_PURPOSE,
            amount,
            lines=[line(codes["drug"], amount)],
        )

    # Captured within the 15 minutes: allowed.
    early = pharmacy(4_000)
    shown = get(authorizations, PHARMACY, early.authorization_id)
    assert shown.expires_at.ToMilliseconds() - shown.created_at.ToMilliseconds() == (
        PHARMACY_HOLD_MS
    )
    assert early.expires_at == shown.expires_at
    harness.clock.advance(880)
    assert capture(authorizations, PHARMACY, early.authorization_id).status == CAPTURED
    assert figures(relationships, rid) == (46_000, 0, 4_000)

    # Past the 15 minutes: the money returns by itself (the sweeper), and capture is refused.
    late = pharmacy(6_000)
    assert figures(relationships, rid) == (40_000, 6_000, 4_000)
    harness.clock.advance(901)
    wait_for(lambda: figures(relationships, rid) == (46_000, 0, 4_000))
    refused(
        lambda: capture(authorizations, PHARMACY, late.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHORIZATION_EXPIRED",
    )
    refused(
        lambda: void(authorizations, PHARMACY, late.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHORIZATION_EXPIRED",
    )
    assert get(authorizations, PHARMACY, late.authorization_id).status == EXPIRED
    assert figures(relationships, rid) == (46_000, 0, 4_000)


def test_expired_hold_is_refused_even_before_the_sweeper_runs(
    harness: Harness, registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 10_000)
    [rid] = fam.relationship_ids
    codes = ef.items(registry)
    answer = authorize(
        authorizations,
        PHARMACY,
        fam.beneficiary_id,
        PHARMACY_PURPOSE,
        10_000,
        lines=[line(codes["device"], 10_000)],
    )
    assert answer.remaining_quota_fen == 0
    harness.clock.advance(901)
    # The capture script expires it lazily itself, whether or not the sweeper came first.
    refused(
        lambda: capture(authorizations, PHARMACY, answer.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHORIZATION_EXPIRED",
    )
    assert figures(relationships, rid) == (10_000, 0, 0)
    # The returned money can be held again at once.
    again = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    assert (again.decision, again.remaining_quota_fen) == (APPROVED, 0)
    assert figures(relationships, rid) == (0, 10_000, 0)


def test_medical_hold_lasts_24_hours(
    harness: Harness, registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    first = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    second = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 20_000)
    shown = get(authorizations, HOSPITAL, first.authorization_id)
    assert shown.expires_at.ToMilliseconds() - shown.created_at.ToMilliseconds() == (
        MEDICAL_HOLD_MS
    )
    harness.clock.advance(901)  # past a pharmacy hold, well within a medical one
    time.sleep(1.2)  # a sweep runs
    assert figures(relationships, rid) == (20_000, 30_000, 0)
    assert capture(authorizations, HOSPITAL, first.authorization_id).status == CAPTURED
    assert figures(relationships, rid) == (20_000, 20_000, 10_000)
    harness.clock.advance(86_400 - 901)
    refused(
        lambda: capture(authorizations, HOSPITAL, second.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHORIZATION_EXPIRED",
    )
    assert figures(relationships, rid) == (40_000, 0, 10_000)


# --- each authorization resolves once --------------------------------------------------------


def test_capture_then_void_is_already_captured(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    assert capture(authorizations, HOSPITAL, answer.authorization_id).status == CAPTURED
    refused(
        lambda: void(authorizations, HOSPITAL, answer.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )
    # A second capture with another key is refused too; the money moved once.
    refused(
        lambda: capture(authorizations, HOSPITAL, answer.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )
    assert figures(relationships, rid) == (40_000, 0, 10_000)
    assert get(authorizations, HOSPITAL, answer.authorization_id).captured_amount_fen == 10_000


def test_void_then_capture_is_already_voided(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    assert figures(relationships, rid) == (40_000, 10_000, 0)
    voided = void(authorizations, HOSPITAL, answer.authorization_id)
    assert (voided.status, voided.captured_amount_fen) == (VOIDED, 0)
    assert figures(relationships, rid) == (50_000, 0, 0)
    # Voiding again is a harmless repeat: the money is not released twice.
    assert void(authorizations, HOSPITAL, answer.authorization_id).status == VOIDED
    refused(
        lambda: capture(authorizations, HOSPITAL, answer.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_VOIDED",
    )
    assert figures(relationships, rid) == (50_000, 0, 0)


def test_partial_capture_releases_the_rest_at_once(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 30_000)
    refused(
        lambda: capture(authorizations, HOSPITAL, answer.authorization_id, 30_001),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        field="amount_fen",
    )
    assert figures(relationships, rid) == (20_000, 30_000, 0)
    captured = capture(authorizations, HOSPITAL, answer.authorization_id, 12_000)
    assert (captured.status, captured.approved_amount_fen, captured.captured_amount_fen) == (
        CAPTURED,
        30_000,
        12_000,
    )
    assert funding(captured.funding) == [(rid, 30_000)]
    assert figures(relationships, rid) == (38_000, 0, 12_000)


# --- refunds ---------------------------------------------------------------------------------


def test_refund_up_to_what_was_captured_back_to_the_quota(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 30_000)
    capture(authorizations, HOSPITAL, answer.authorization_id, 20_000)
    assert figures(relationships, rid) == (30_000, 0, 20_000)

    first = refund(authorizations, HOSPITAL, answer.authorization_id, 5_000)
    assert first.authorization.refunded_amount_fen == 5_000
    assert [(p.relationship_id, p.amount_fen, p.to_personal_account) for p in first.parts] == [
        (rid, 5_000, False)
    ]
    assert figures(relationships, rid) == (35_000, 0, 15_000)

    refused(
        lambda: refund(authorizations, HOSPITAL, answer.authorization_id, 15_001),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFUND_EXCEEDS_CAPTURED",
    )
    assert figures(relationships, rid) == (35_000, 0, 15_000)
    rest = refund(authorizations, HOSPITAL, answer.authorization_id, 15_000)
    assert (rest.authorization.captured_amount_fen, rest.authorization.refunded_amount_fen) == (
        20_000,
        20_000,
    )
    assert figures(relationships, rid) == (50_000, 0, 0)
    refused(
        lambda: refund(authorizations, HOSPITAL, answer.authorization_id, 1),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFUND_EXCEEDS_CAPTURED",
    )
    shown = get(authorizations, HOSPITAL, answer.authorization_id)
    assert (shown.captured_amount_fen, shown.refunded_amount_fen) == (20_000, 20_000)


def test_a_refund_whose_redis_credit_was_lost_is_credited_by_its_retry(
    harness, registry, relationships, authorizations
) -> None:
    """The refund committed in SQL, its credit back to the quota failed in Redis (a timeout:
    UNAVAILABLE, the till retries): the retry's replay sets the quota from the ledger, so the
    money refunded can be spent at once, not after the rolling reconcile reaches the quota."""
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 30_000)
    capture(authorizations, HOSPITAL, answer.authorization_id, 20_000)
    quotas = harness.app.authorizations.quotas
    real_credit = quotas.credit

    async def lost(*arguments: Any) -> bool:
        # What the quota cache raises for a Redis timeout (storage/redis/quota_cache.guarded).
        raise Unavailable("the quota store did not answer: TimeoutError")

    key = new_id("refund")
    quotas.credit = lost
    try:
        refused(
            lambda: refund(authorizations, HOSPITAL, answer.authorization_id, 5_000, key),
            grpc.StatusCode.UNAVAILABLE,
            "UNAVAILABLE",
        )
    finally:
        quotas.credit = real_credit
    again = refund(authorizations, HOSPITAL, answer.authorization_id, 5_000, key)
    assert again.authorization.refunded_amount_fen == 5_000
    assert figures(relationships, rid) == (35_000, 0, 15_000)


def test_nothing_to_refund_before_a_capture(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    refused(
        lambda: refund(authorizations, HOSPITAL, answer.authorization_id, 1_000),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFUND_EXCEEDS_CAPTURED",
    )
    assert figures(relationships, rid) == (40_000, 10_000, 0)


def test_refund_after_dissolution_goes_to_the_personal_account(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000, spare=7_000)
    [rid] = fam.relationship_ids
    [holder] = fam.holder_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 20_000)
    capture(authorizations, HOSPITAL, answer.authorization_id)
    assert factories.balance(registry, holder) == 7_000
    assert dissolve(relationships, rid) == 30_000
    assert factories.balance(registry, holder) == 37_000
    assert figures(relationships, rid) == (0, 0, 20_000)

    refunded = refund(authorizations, HOSPITAL, answer.authorization_id, 8_000)
    assert [(p.relationship_id, p.amount_fen, p.to_personal_account) for p in refunded.parts] == [
        (rid, 8_000, True)
    ]
    assert refunded.authorization.refunded_amount_fen == 8_000
    assert factories.balance(registry, holder) == 45_000
    assert figures(relationships, rid) == (0, 0, 12_000)
    refused(
        lambda: refund(authorizations, HOSPITAL, answer.authorization_id, 12_001),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFUND_EXCEEDS_CAPTURED",
    )
    assert factories.balance(registry, holder) == 45_000


def test_refund_of_a_split_payment_goes_back_last_drawn_first(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 10_000, 10_000)
    first, second = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    assert funding(answer.funding) == [(first, 10_000), (second, 5_000)]
    captured = capture(authorizations, HOSPITAL, answer.authorization_id)
    assert captured.captured_amount_fen == 15_000
    assert all_figures(relationships, [first, second]) == [(0, 0, 10_000), (5_000, 0, 5_000)]
    refunded = refund(authorizations, HOSPITAL, answer.authorization_id, 7_000)
    assert [(p.relationship_id, p.amount_fen, p.to_personal_account) for p in refunded.parts] == [
        (second, 5_000, False),
        (first, 2_000, False),
    ]
    assert all_figures(relationships, [first, second]) == [(2_000, 0, 8_000), (10_000, 0, 0)]


# --- funding choice --------------------------------------------------------------------------


def test_one_quota_that_covers_it_is_used_alone(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 5_000, 20_000, 30_000)
    small, middle, large = fam.relationship_ids
    # The oldest quota that covers the whole amount, alone (the smaller, older one is skipped).
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    assert answer.decision == APPROVED
    assert funding(answer.funding) == [(middle, 15_000)]
    assert answer.remaining_quota_fen == 40_000
    assert all_figures(relationships, [small, middle, large]) == [
        (5_000, 0, 0),
        (5_000, 15_000, 0),
        (30_000, 0, 0),
    ]
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 3_000)
    assert funding(answer.funding) == [(small, 3_000)]
    assert answer.remaining_quota_fen == 37_000


def test_split_across_quotas_when_none_covers_it_alone(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 5_000, 20_000, 30_000)
    rids = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 52_000)
    assert answer.decision == APPROVED
    assert answer.approved_amount_fen == 52_000
    assert funding(answer.funding) == [(rids[0], 5_000), (rids[1], 20_000), (rids[2], 27_000)]
    assert answer.remaining_quota_fen == 3_000
    assert all_figures(relationships, rids) == [(0, 5_000, 0), (0, 20_000, 0), (3_000, 27_000, 0)]

    # A partial capture draws from the parts in order; the rest returns to each quota.
    captured = capture(authorizations, HOSPITAL, answer.authorization_id, 10_000)
    assert captured.captured_amount_fen == 10_000
    assert all_figures(relationships, rids) == [
        (0, 0, 5_000),
        (15_000, 0, 5_000),
        (30_000, 0, 0),
    ]

    # More than all of them hold: declined whole (medical without allow_partial)...
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 45_001)
    assert_declined(answer, pb.DECLINE_REASON_INSUFFICIENT_QUOTA, 45_000)
    assert all_figures(relationships, rids) == [(0, 0, 5_000), (15_000, 0, 5_000), (30_000, 0, 0)]
    # ...or, with allow_partial, all that is there, split.
    answer = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 50_000, allow_partial=True
    )
    assert (answer.decision, answer.approved_amount_fen) == (PARTIAL, 45_000)
    assert funding(answer.funding) == [(rids[1], 15_000), (rids[2], 30_000)]
    assert answer.remaining_quota_fen == 0
    assert all_figures(relationships, rids) == [
        (0, 0, 5_000),
        (0, 15_000, 5_000),
        (0, 30_000, 0),
    ]


def test_premium_split_across_quotas_is_captured_from_each(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 3_000, 4_000)
    first, second = fam.relationship_ids
    answer = authorize(authorizations, COLLECTOR, fam.beneficiary_id, RESIDENT_PREMIUM, 6_000)
    assert (answer.decision, answer.status) == (APPROVED, CAPTURED)
    assert funding(answer.funding) == [(first, 3_000), (second, 3_000)]
    assert answer.remaining_quota_fen == 1_000
    assert all_figures(relationships, [first, second]) == [(0, 0, 3_000), (1_000, 0, 3_000)]


def test_named_relationship(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 10_000, 20_000, 5_000)
    first, second, third = fam.relationship_ids
    stranger = family(registry, relationships, 50_000)
    [stranger_rid] = stranger.relationship_ids

    # Named: only that quota is used, never split, even when others could cover it.
    answer = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000, relationship_id=second
    )
    assert funding(answer.funding) == [(second, 8_000)]
    assert answer.remaining_quota_fen == 12_000
    answer = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_001, relationship_id=second
    )
    assert_declined(answer, pb.DECLINE_REASON_INSUFFICIENT_QUOTA, 12_000)

    # Another beneficiary's relationship is not found.
    answer = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 1_000, relationship_id=stranger_rid
    )
    assert_declined(answer, pb.DECLINE_REASON_RELATIONSHIP_NOT_FOUND, 0)
    answer = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 1_000, relationship_id="nope"
    )
    assert_declined(answer, pb.DECLINE_REASON_RELATIONSHIP_NOT_FOUND, 0)

    # A dissolved one is not active; the others still fund what the service chooses.
    dissolve(relationships, third)
    answer = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 1_000, relationship_id=third
    )
    assert_declined(answer, pb.DECLINE_REASON_RELATIONSHIP_NOT_ACTIVE, 0)
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    assert funding(answer.funding) == [(first, 10_000), (second, 5_000)]
    assert all_figures(relationships, [first, second, third, stranger_rid]) == [
        (0, 10_000, 0),
        (7_000, 13_000, 0),
        (0, 0, 0),
        (50_000, 0, 0),
    ]


def test_beneficiary_without_a_quota(registry, relationships, authorizations) -> None:
    beneficiary = factories.resident(registry)
    answer = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 1_000)
    assert_declined(answer, pb.DECLINE_REASON_RELATIONSHIP_NOT_FOUND, 0)
    # Once all of its relationships are dissolved, it has none to draw on either.
    fam = family(registry, relationships, 5_000)
    [rid] = fam.relationship_ids
    assert authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 1_000).decision == (
        APPROVED
    )
    dissolve(relationships, rid)
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 1_000)
    assert_declined(answer, pb.DECLINE_REASON_RELATIONSHIP_NOT_FOUND, 0)
    assert figures(relationships, rid) == (0, 0, 0)


# --- dissolution and insurance events with open holds ----------------------------------------


def test_dissolution_voids_open_holds(registry, relationships, authorizations) -> None:
    fam = family(registry, relationships, 50_000, spare=1_000)
    [rid] = fam.relationship_ids
    [holder] = fam.holder_ids
    open_hold = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 20_000)
    done = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 5_000)
    capture(authorizations, HOSPITAL, done.authorization_id)
    assert figures(relationships, rid) == (25_000, 20_000, 5_000)

    # Available and held both go back to the holder; captured money stays spent.
    assert dissolve(relationships, rid) == 45_000
    assert factories.balance(registry, holder) == 46_000
    assert figures(relationships, rid) == (0, 0, 5_000)
    refused(
        lambda: capture(authorizations, HOSPITAL, open_hold.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "RELATIONSHIP_NOT_ACTIVE",
    )
    assert get(authorizations, HOSPITAL, open_hold.authorization_id).status == VOIDED
    assert get(authorizations, HOSPITAL, done.authorization_id).status == CAPTURED
    assert factories.balance(registry, holder) == 46_000
    assert figures(relationships, rid) == (0, 0, 5_000)


def test_dissolving_one_quota_of_a_split_hold_returns_the_others_part(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 10_000, 10_000, 10_000)
    first, second, third = fam.relationship_ids
    split = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    assert funding(split.funding) == [(first, 10_000), (second, 5_000)]
    alone = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 4_000, relationship_id=third
    )
    assert all_figures(relationships, [first, second, third]) == [
        (0, 10_000, 0),
        (5_000, 5_000, 0),
        (6_000, 4_000, 0),
    ]
    assert dissolve(relationships, first) == 10_000
    # The split hold is void: the second quota has its part back; the third's hold is untouched.
    assert all_figures(relationships, [first, second, third]) == [
        (0, 0, 0),
        (10_000, 0, 0),
        (6_000, 4_000, 0),
    ]
    refused(
        lambda: capture(authorizations, HOSPITAL, split.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "RELATIONSHIP_NOT_ACTIVE",
    )
    # A hold on a relationship still active is captured as usual.
    assert capture(authorizations, HOSPITAL, alone.authorization_id).status == CAPTURED
    assert all_figures(relationships, [first, second, third]) == [
        (0, 0, 0),
        (10_000, 0, 0),
        (6_000, 0, 4_000),
    ]


def test_insurance_event_voids_the_holds_of_every_relationship(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 10_000, 20_000, spare=0)
    first, second = fam.relationship_ids
    hold = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 25_000)
    assert funding(hold.funding) == [(first, 10_000), (second, 15_000)]
    event = registry.ReportInsuranceEvent(
        registry_pb2.ReportInsuranceEventRequest(
            participant_id=fam.beneficiary_id,
            event_type=registry_pb2.INSURANCE_EVENT_TYPE_TERMINATED,
            termination_reason=registry_pb2.TERMINATION_REASON_DEATH,
        ),
        metadata=ADMIN,
    )
    assert sorted(event.dissolved_relationship_ids) == sorted([first, second])
    assert event.returned_fen == 30_000
    assert [factories.balance(registry, h) for h in fam.holder_ids] == [10_000, 20_000]
    assert all_figures(relationships, [first, second]) == [(0, 0, 0), (0, 0, 0)]
    refused(
        lambda: capture(authorizations, HOSPITAL, hold.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "RELATIONSHIP_NOT_ACTIVE",
    )
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 1_000)
    assert_declined(answer, pb.DECLINE_REASON_RELATIONSHIP_NOT_FOUND, 0)
    assert [factories.balance(registry, h) for h in fam.holder_ids] == [10_000, 20_000]


def test_an_expired_hold_purged_from_redis_is_still_refused_as_expired(
    harness: Harness, registry, relationships, authorizations
) -> None:
    """purge-idempotency drops the settled authorization hashes of closed months (EXPIRED
    included, storage/redis/retention.py); a later Capture is answered from SQL's journal
    (service/lost_authorizations.py), and must still say AUTHORIZATION_EXPIRED, as
    GetAuthorization and Void do."""
    from authz_server.service.ports import STALE_CAPTURE_SECONDS
    from authz_server.storage.redis import keys

    fam = family(registry, relationships, 10_000)
    codes = ef.items(registry)
    answer = authorize(
        authorizations, PHARMACY, fam.beneficiary_id, PHARMACY_PURPOSE, 10_000,
        lines=[line(codes["device"], 10_000)],
    )  # fmt: skip
    harness.clock.advance(901)
    refused(
        lambda: capture(authorizations, PHARMACY, answer.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHORIZATION_EXPIRED",
    )
    harness.run(harness.app.journal.flush())
    # What purge_settled_authorizations_before does to it once its month is closed.
    harness.run(
        harness.app.pipelined_redis.execute("UNLINK", keys.authorization(answer.authorization_id))
    )
    # A closed month's purge comes long after the hold's time (within STALE_CAPTURE_SECONDS of
    # it, SQL alone cannot tell that no capture claimed before it will still commit: UNAVAILABLE,
    # tests/test_capture_lost_claim_not_put_back.py).
    harness.clock.advance(STALE_CAPTURE_SECONDS)
    assert get(authorizations, PHARMACY, answer.authorization_id).status == EXPIRED
    refused(
        lambda: void(authorizations, PHARMACY, answer.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHORIZATION_EXPIRED",
    )
    refused(
        lambda: capture(authorizations, PHARMACY, answer.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHORIZATION_EXPIRED",
    )


def test_a_void_refused_by_the_run_gate_after_its_sql_commit_waits_for_the_rebuild(
    harness: Harness, registry, relationships, authorizations
) -> None:
    """Void writes SQL first, then voids the hold in Redis. A Redis process the adopted
    generation was not built on (a replica promoted, a Redis restarted: the run gate) refuses
    that step with UntrustedRedis until the guardian adopts the rebuilt generation; a rebuild
    that read SQL before the void put the hold back. Dropped as UNAVAILABLE, the money stays held
    in Redis although SQL voided it (a wrong decline until the hold expires, 24 h for a medical
    hold): the step waits for the rebuild, as a credit and a capture's finish do."""
    fam = family(registry, relationships, 10_000)
    [rid] = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    assert figures(relationships, rid) == (0, 10_000, 0)
    merchant_id = get(authorizations, HOSPITAL, answer.authorization_id).merchant_id
    gate = harness.app.pipelined_redis.run_gate
    assert gate is not None and gate.trusted_run_ids
    # The failover: the Redis answering now is not the process the generation was built on
    # (here its content is what a rebuild that read SQL before the void would have written).
    gate.trusted_run_ids = frozenset({"0" * 40})
    view = harness.run(harness.app.authorizations.void(merchant_id, answer.authorization_id))
    assert view.status.name == "VOIDED"
    assert figures(relationships, rid) == (10_000, 0, 0)
