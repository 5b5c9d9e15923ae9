"""The engine's main path: authorize, capture part, refund; the quota follows to the fen."""

from __future__ import annotations

from authz_server.generated.medwallet.v1 import authorization_pb2, common_pb2
from tests import engine_factories as ef
from tests import factories


def test_authorize_capture_refund(registry, relationships, authorizations) -> None:
    ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    holder = factories.employee(registry, balance_fen=100_000)
    parent = factories.resident(registry)
    relationship_id = factories.active_relationship(relationships, holder, parent, 50_000)

    answer = authorizations.Authorize(ef.medical(parent, 30_000), metadata=ef.HOSPITAL_TOKEN)
    assert answer.decision == authorization_pb2.DECISION_APPROVED
    assert answer.approved_amount_fen == 30_000
    assert answer.remaining_quota_fen == 20_000
    shown = factories.relationship(relationships, relationship_id)
    assert (shown.available_fen, shown.held_fen) == (20_000, 30_000)

    captured = authorizations.Capture(
        authorization_pb2.CaptureRequest(
            authorization_id=answer.authorization_id, amount_fen=25_000, idempotency_key="c1"
        ),
        metadata=ef.HOSPITAL_TOKEN,
    )
    assert captured.authorization.status == authorization_pb2.AUTHORIZATION_STATUS_CAPTURED
    shown = factories.relationship(relationships, relationship_id)
    assert (shown.available_fen, shown.held_fen, shown.spent_fen) == (25_000, 0, 25_000)

    refunded = authorizations.Refund(
        authorization_pb2.RefundRequest(
            authorization_id=answer.authorization_id, amount_fen=5_000, idempotency_key="r1"
        ),
        metadata=ef.HOSPITAL_TOKEN,
    )
    assert refunded.authorization.refunded_amount_fen == 5_000
    shown = factories.relationship(relationships, relationship_id)
    assert (shown.available_fen, shown.held_fen, shown.spent_fen) == (30_000, 0, 20_000)
    assert shown.allocated_fen == shown.available_fen + shown.held_fen + shown.spent_fen


def test_capture_answers_like_get(registry, relationships, authorizations) -> None:
    ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    holder = factories.employee(registry, balance_fen=10_000)
    parent = factories.resident(registry)
    factories.active_relationship(relationships, holder, parent, 5_000)
    answer = authorizations.Authorize(ef.medical(parent, 3_000), metadata=ef.HOSPITAL_TOKEN)
    captured = authorizations.Capture(
        authorization_pb2.CaptureRequest(
            authorization_id=answer.authorization_id, idempotency_key="like-get"
        ),
        metadata=ef.HOSPITAL_TOKEN,
    ).authorization
    shown = authorizations.GetAuthorization(
        authorization_pb2.GetAuthorizationRequest(authorization_id=answer.authorization_id),
        metadata=ef.HOSPITAL_TOKEN,
    ).authorization
    assert captured.created_at.seconds > 0
    assert captured.expires_at == answer.expires_at
    assert captured == shown
