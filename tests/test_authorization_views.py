"""Every RPC that returns an Authorization returns the same view of it: Capture, Refund and
Void answer field by field what GetAuthorization shows right after, with the authorization's
own times and its funding both as approved (`funding`) and as captured (`captured_funding`)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
    registry_pb2_grpc,
    relationship_pb2_grpc,
)
from tests import engine_factories as ef
from tests import factories
from tests.harness import new_id

TOKEN = ef.HOSPITAL_TOKEN


def fields(authorization: authorization_pb2.Authorization) -> dict[str, Any]:
    """Every field of the view, unset ones included, by proto name."""
    return json_format.MessageToDict(
        authorization, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def assert_same_view(
    answer: authorization_pb2.Authorization, shown: authorization_pb2.Authorization
) -> None:
    answered, got = fields(answer), fields(shown)
    differ = {name: (answered.get(name), got.get(name)) for name in answered.keys() | got.keys()
              if answered.get(name) != got.get(name)}  # fmt: skip
    assert not differ, f"fields differing from GetAuthorization: {differ}"


def parts(authorization: authorization_pb2.Authorization, name: str) -> list[tuple[str, int]]:
    return [(p.relationship_id, p.amount_fen) for p in getattr(authorization, name)]


def test_get_capture_refund_and_void_answer_the_same_view(
    registry: registry_pb2_grpc.RegistryServiceStub,
    relationships: relationship_pb2_grpc.RelationshipServiceStub,
    authorizations: authorization_pb2_grpc.AuthorizationServiceStub,
) -> None:
    ef.merchant(registry, "merchant-a", common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    parent = factories.resident(registry)
    first = factories.active_relationship(
        relationships, factories.employee(registry, 10_000), parent, 1_000
    )
    second = factories.active_relationship(
        relationships, factories.employee(registry, 10_000), parent, 2_500
    )

    def get(authorization_id: str) -> authorization_pb2.Authorization:
        request = authorization_pb2.GetAuthorizationRequest(authorization_id=authorization_id)
        return authorizations.GetAuthorization(request, metadata=TOKEN).authorization

    # 3,000 fits no single quota: split 1,000 + 2,000 across both, in order
    authorized = authorizations.Authorize(ef.medical(parent, 3_000), metadata=TOKEN)
    authorization_id = authorized.authorization_id
    pending = get(authorization_id)
    approved = [(first, 1_000), (second, 2_000)]
    assert parts(pending, "funding") == approved and parts(pending, "captured_funding") == []
    assert pending.expires_at == authorized.expires_at and pending.HasField("created_at")
    assert not pending.HasField("captured_at")

    captured = authorizations.Capture(
        authorization_pb2.CaptureRequest(
            authorization_id=authorization_id, amount_fen=1_500, idempotency_key=new_id("cap")
        ),
        metadata=TOKEN,
    ).authorization
    assert_same_view(captured, get(authorization_id))
    assert parts(captured, "funding") == approved  # as approved, still
    assert parts(captured, "captured_funding") == [(first, 1_000), (second, 500)]
    assert captured.captured_amount_fen == 1_500 and captured.HasField("captured_at")

    refunded = authorizations.Refund(
        authorization_pb2.RefundRequest(
            authorization_id=authorization_id, amount_fen=700, idempotency_key=new_id("ref")
        ),
        metadata=TOKEN,
    ).authorization
    assert_same_view(refunded, get(authorization_id))
    assert refunded.refunded_amount_fen == 700
    for name in ("funding", "captured_funding", "created_at", "expires_at", "captured_at"):
        assert fields(refunded)[name] == fields(captured)[name], name
        assert fields(refunded).get(name) is not None, name
    assert (refunded.created_at, refunded.expires_at) == (pending.created_at, pending.expires_at)

    other = authorizations.Authorize(ef.medical(parent, 400), metadata=TOKEN).authorization_id
    voided = authorizations.Void(
        authorization_pb2.VoidRequest(authorization_id=other), metadata=TOKEN
    ).authorization
    assert_same_view(voided, get(other))
    assert voided.status == authorization_pb2.AUTHORIZATION_STATUS_VOIDED
    assert parts(voided, "funding") == [(first, 400)] or parts(voided, "funding") == [(second, 400)]
    assert parts(voided, "captured_funding") == [] and not voided.HasField("captured_at")


def test_the_times_shown_are_the_same_from_redis_and_from_sql(
    harness: Any,
    registry: registry_pb2_grpc.RegistryServiceStub,
    relationships: relationship_pb2_grpc.RelationshipServiceStub,
    authorizations: authorization_pb2_grpc.AuthorizationServiceStub,
) -> None:
    """Redis keeps an authorization's times in milliseconds; SQL kept its created_at to the
    microsecond, so GetAuthorization showed another created_at once Redis no longer had the
    hash (a Redis loss, a closed month's purge) than it showed before. Both agree now."""
    from authz_server.storage.redis import keys

    ef.merchant(registry, "merchant-a", common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    parent = factories.resident(registry)
    factories.active_relationship(
        relationships, factories.employee(registry, 10_000), parent, 5_000
    )

    def get(authorization_id: str) -> authorization_pb2.Authorization:
        request = authorization_pb2.GetAuthorizationRequest(authorization_id=authorization_id)
        return authorizations.GetAuthorization(request, metadata=TOKEN).authorization

    for _ in range(5):  # one in a thousand clock readings falls on a whole millisecond
        authorized = authorizations.Authorize(ef.medical(parent, 100), metadata=TOKEN)
        authorization_id = authorized.authorization_id
        voided = authorizations.Void(
            authorization_pb2.VoidRequest(authorization_id=authorization_id), metadata=TOKEN
        ).authorization
        from_redis = get(authorization_id)
        harness.run(harness.app.journal.flush())
        harness.run(
            harness.app.pipelined_redis.execute("UNLINK", keys.authorization(authorization_id))
        )
        from_sql = get(authorization_id)
        assert from_sql.status == from_redis.status == authorization_pb2.AUTHORIZATION_STATUS_VOIDED
        for name in ("created_at", "expires_at"):
            assert getattr(from_sql, name) == getattr(from_redis, name) == getattr(voided, name), (
                name
            )
        assert from_redis.expires_at == authorized.expires_at
