"""Idempotency of the authorization engine's writes (issue 3): Authorize, Capture and Refund
retried with the same key answer the first answer byte for byte and move money once, also from
another connection and after a server restart; the same key with another body is refused
(ALREADY_EXISTS, IDEMPOTENCY_KEY_REUSED) and nothing moves. Void is idempotent by state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from authz_server.domain.types import LedgerKind
from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.generated.medwallet.v1 import authorization_pb2_grpc, relationship_pb2
from authz_server.server.app import Application
from authz_server.storage.sql.tables import CaptureRow, LedgerEntryRow, RefundRow
from tests import engine_factories as ef
from tests.harness import APP, Harness, new_id
from tests.test_authorization_rules import (
    COLLECTOR,
    HOSPITAL,
    HOSPITAL_2,
    MEDICAL,
    PHARMACY,
    PHARMACY_PURPOSE,
    RESIDENT_PREMIUM,
    authorize,
    authorize_request,
    capture,
    family,
    figures,
    line,
    refund,
    refused,
    register_merchants,
)

THREADS = 8


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


def key_reused(call: Callable[[], Any]) -> None:
    refused(call, grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")


def concurrently(call: Callable[[], Any], times: int = THREADS) -> list[bytes]:
    with ThreadPoolExecutor(times) as pool:
        futures = [pool.submit(call) for _ in range(times)]
        return [future.result().SerializeToString() for future in futures]


def ledger_rows(harness: Harness, authorization_id: str, kind: LedgerKind) -> list[int]:
    return harness.app.database.transaction(
        lambda session: list(
            session.scalars(
                select(LedgerEntryRow.amount_fen)
                .where(
                    LedgerEntryRow.authorization_id == authorization_id,
                    LedgerEntryRow.kind == kind.value,
                )
                .order_by(LedgerEntryRow.entry_id)
            )
        )
    )


def count(harness: Harness, table: Any, authorization_id: str) -> int:
    return harness.app.database.transaction(
        lambda session: session.scalar(
            select(func.count())
            .select_from(table)
            .where(table.authorization_id == authorization_id)
        )
    )


@pytest.fixture()
def restarted(harness: Harness) -> Iterator[authorization_pb2_grpc.AuthorizationServiceStub]:
    """A second server process on the same SQL and Redis (a restart, as far as state goes: the
    first process's memory plays no part in its answers), reached on a fresh connection."""
    second = harness.run(_second_application(harness))
    port = harness.run(second.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield authorization_pb2_grpc.AuthorizationServiceStub(channel)
    finally:
        harness.run(second.stop(0))


async def _second_application(harness: Harness) -> Application:
    return Application(
        replace(harness.settings, grpc_port=0), harness.redis_url, clock=harness.clock
    )


# --- Authorize -------------------------------------------------------------------------------


def test_authorize_retry_answers_the_first_answer_and_holds_once(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 4_000, 3_000)
    first, second = fam.relationship_ids
    codes = ef.items(registry)
    request = authorize_request(
        fam.beneficiary_id,
        PHARMACY_PURPOSE,
        9_000,
        lines=[
            line(codes["drug"], 5_000),
            line(codes["cosmetic"], 1_000),
            line(codes["device"], 3_000),
        ],
        allow_partial=True,
    )
    answer = authorizations.Authorize(request, metadata=PHARMACY)
    assert (answer.decision, answer.approved_amount_fen) == (pb.DECISION_PARTIALLY_APPROVED, 7_000)
    assert [(p.relationship_id, p.amount_fen) for p in answer.funding] == [
        (first, 4_000),
        (second, 3_000),
    ]
    original = answer.SerializeToString()

    retries = concurrently(lambda: authorizations.Authorize(request, metadata=PHARMACY))
    assert set(retries) == {original}
    assert [figures(relationships, rid) for rid in (first, second)] == [
        (0, 4_000, 0),
        (0, 3_000, 0),
    ]


def test_authorize_retry_of_a_decline_answers_the_decline(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 5_000)
    [rid] = fam.relationship_ids
    request = authorize_request(fam.beneficiary_id, MEDICAL, 8_000)
    answer = authorizations.Authorize(request, metadata=HOSPITAL)
    assert answer.decline_reason == pb.DECLINE_REASON_INSUFFICIENT_QUOTA
    # The quota grows; the retry still answers the original decline and holds nothing.
    relationships.AllocateQuota(
        relationship_pb2.AllocateQuotaRequest(
            relationship_id=rid, amount_fen=5_000, idempotency_key=new_id("alloc")
        ),
        metadata=APP,
    )
    again = authorizations.Authorize(request, metadata=HOSPITAL)
    assert again.SerializeToString() == answer.SerializeToString()
    assert figures(relationships, rid) == (10_000, 0, 0)
    # A new key is a new request.
    fresh = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
    assert fresh.decision == pb.DECISION_APPROVED
    assert figures(relationships, rid) == (2_000, 8_000, 0)


def test_premium_retry_answers_the_capture_and_pays_once(
    harness: Harness, registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    request = authorize_request(fam.beneficiary_id, RESIDENT_PREMIUM, 38_000)
    answer = authorizations.Authorize(request, metadata=COLLECTOR)
    assert answer.status == pb.AUTHORIZATION_STATUS_CAPTURED
    retries = concurrently(lambda: authorizations.Authorize(request, metadata=COLLECTOR))
    assert set(retries) == {answer.SerializeToString()}
    assert figures(relationships, rid) == (12_000, 0, 38_000)
    assert ledger_rows(harness, answer.authorization_id, LedgerKind.CAPTURE) == [38_000]


def test_authorize_same_key_with_another_body_is_refused(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    key = new_id("auth")
    answer = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000, idempotency_key=key
    )
    assert figures(relationships, rid) == (40_000, 10_000, 0)
    for other in (
        {"amount_fen": 10_001},
        {"allow_partial": True},
        {"relationship_id": rid},
        {"capture": True},
    ):
        fields: dict[str, Any] = {"amount_fen": 10_000, "idempotency_key": key, **other}
        amount = fields.pop("amount_fen")
        key_reused(
            lambda fields=fields, amount=amount: authorize(
                authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, amount, **fields
            )
        )
    assert figures(relationships, rid) == (40_000, 10_000, 0)
    # Keys are per merchant: another merchant's identical request is its own authorization.
    theirs = authorize(
        authorizations, HOSPITAL_2, fam.beneficiary_id, MEDICAL, 10_000, idempotency_key=key
    )
    assert theirs.decision == pb.DECISION_APPROVED
    assert theirs.authorization_id != answer.authorization_id
    assert figures(relationships, rid) == (30_000, 20_000, 0)


def test_retries_after_a_restart_answer_from_persisted_state(
    harness: Harness, registry, relationships, authorizations, restarted
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    held_request = authorize_request(fam.beneficiary_id, MEDICAL, 10_000)
    held = authorizations.Authorize(held_request, metadata=HOSPITAL)
    paid_request = authorize_request(fam.beneficiary_id, MEDICAL, 20_000)
    paid = authorizations.Authorize(paid_request, metadata=HOSPITAL)
    capture_request = pb.CaptureRequest(
        authorization_id=paid.authorization_id, amount_fen=15_000, idempotency_key=new_id("c")
    )
    captured = authorizations.Capture(capture_request, metadata=HOSPITAL)
    refund_request = pb.RefundRequest(
        authorization_id=paid.authorization_id, amount_fen=4_000, idempotency_key=new_id("r")
    )
    refunded = authorizations.Refund(refund_request, metadata=HOSPITAL)
    assert figures(relationships, rid) == (29_000, 10_000, 11_000)

    # The restarted server answers every retry as the first server did.
    assert restarted.Authorize(held_request, metadata=HOSPITAL) == held
    assert restarted.Authorize(paid_request, metadata=HOSPITAL) == paid
    assert (
        restarted.Capture(capture_request, metadata=HOSPITAL).SerializeToString()
        == captured.SerializeToString()
    )
    assert (
        restarted.Refund(refund_request, metadata=HOSPITAL).SerializeToString()
        == refunded.SerializeToString()
    )
    key_reused(
        lambda: restarted.Authorize(
            authorize_request(
                fam.beneficiary_id, MEDICAL, 10_001, idempotency_key=held_request.idempotency_key
            ),
            metadata=HOSPITAL,
        )
    )
    assert figures(relationships, rid) == (29_000, 10_000, 11_000)
    assert ledger_rows(harness, paid.authorization_id, LedgerKind.CAPTURE) == [15_000]
    assert ledger_rows(harness, paid.authorization_id, LedgerKind.REFUND_TO_QUOTA) == [4_000]
    # And the hold placed before the restart is captured through the new server.
    after = restarted.Capture(
        pb.CaptureRequest(authorization_id=held.authorization_id, idempotency_key=new_id("c")),
        metadata=HOSPITAL,
    )
    assert after.authorization.captured_amount_fen == 10_000
    assert figures(relationships, rid) == (29_000, 0, 21_000)


# --- Capture ---------------------------------------------------------------------------------


def test_capture_retry_answers_the_first_answer_and_captures_once(
    harness: Harness, registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 10_000, 10_000)
    first, second = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 16_000)
    request = pb.CaptureRequest(
        authorization_id=answer.authorization_id, amount_fen=12_000, idempotency_key=new_id("c")
    )
    original = authorizations.Capture(request, metadata=HOSPITAL).SerializeToString()
    assert set(concurrently(lambda: authorizations.Capture(request, metadata=HOSPITAL))) == {
        original
    }
    assert ledger_rows(harness, answer.authorization_id, LedgerKind.CAPTURE) == [10_000, 2_000]
    assert count(harness, CaptureRow, answer.authorization_id) == 1
    assert [figures(relationships, rid) for rid in (first, second)] == [
        (0, 0, 10_000),
        (8_000, 0, 2_000),
    ]


def test_capture_same_key_with_another_body_is_refused(
    harness: Harness, registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    one = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    two = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 20_000)
    key = new_id("c")
    capture(authorizations, HOSPITAL, one.authorization_id, 6_000, key=key)
    assert figures(relationships, rid) == (24_000, 20_000, 6_000)
    # The same authorization with another amount, another authorization: both refused.
    key_reused(lambda: capture(authorizations, HOSPITAL, one.authorization_id, 5_000, key=key))
    key_reused(lambda: capture(authorizations, HOSPITAL, two.authorization_id, key=key))
    assert figures(relationships, rid) == (24_000, 20_000, 6_000)
    assert count(harness, CaptureRow, two.authorization_id) == 0
    # The other hold is untouched: still pending, and captured with a key of its own.
    assert capture(authorizations, HOSPITAL, two.authorization_id).captured_amount_fen == 20_000
    assert figures(relationships, rid) == (24_000, 0, 26_000)


# --- Refund ----------------------------------------------------------------------------------


def test_refund_retry_answers_the_first_answer_and_refunds_once(
    harness: Harness, registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 20_000)
    capture(authorizations, HOSPITAL, answer.authorization_id)
    request = pb.RefundRequest(
        authorization_id=answer.authorization_id, amount_fen=7_000, idempotency_key=new_id("r")
    )
    original = authorizations.Refund(request, metadata=HOSPITAL).SerializeToString()
    assert set(concurrently(lambda: authorizations.Refund(request, metadata=HOSPITAL))) == {
        original
    }
    assert ledger_rows(harness, answer.authorization_id, LedgerKind.REFUND_TO_QUOTA) == [7_000]
    assert count(harness, RefundRow, answer.authorization_id) == 1
    assert figures(relationships, rid) == (37_000, 0, 13_000)


def test_refund_same_key_with_another_body_is_refused(
    harness: Harness, registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    one = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    two = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    capture(authorizations, HOSPITAL, one.authorization_id)
    capture(authorizations, HOSPITAL, two.authorization_id)
    key = new_id("r")
    refund(authorizations, HOSPITAL, one.authorization_id, 3_000, key=key)
    assert figures(relationships, rid) == (33_000, 0, 17_000)
    key_reused(lambda: refund(authorizations, HOSPITAL, one.authorization_id, 2_000, key=key))
    key_reused(lambda: refund(authorizations, HOSPITAL, two.authorization_id, 3_000, key=key))
    assert figures(relationships, rid) == (33_000, 0, 17_000)
    assert count(harness, RefundRow, two.authorization_id) == 0
    # Another key refunds the other authorization as usual.
    assert refund(authorizations, HOSPITAL, two.authorization_id, 3_000).parts[0].amount_fen == (
        3_000
    )
    assert figures(relationships, rid) == (36_000, 0, 14_000)


# --- Void ------------------------------------------------------------------------------------


def test_void_repeated_answers_the_same_and_releases_once(
    registry, relationships, authorizations
) -> None:
    fam = family(registry, relationships, 50_000)
    [rid] = fam.relationship_ids
    answer = authorize(authorizations, PHARMACY, fam.beneficiary_id, MEDICAL, 10_000)
    # (A pharmacy may not charge a medical bill: a decline cannot be voided.)
    assert answer.decision == pb.DECISION_DECLINED
    refused(
        lambda: authorizations.Void(
            pb.VoidRequest(authorization_id=answer.authorization_id), metadata=PHARMACY
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHORIZATION_DECLINED",
    )
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    request = pb.VoidRequest(authorization_id=answer.authorization_id)
    first = authorizations.Void(request, metadata=HOSPITAL).SerializeToString()
    assert set(concurrently(lambda: authorizations.Void(request, metadata=HOSPITAL))) == {first}
    assert figures(relationships, rid) == (50_000, 0, 0)
