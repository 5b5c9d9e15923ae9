"""After Redis lost its data, another request under a key SQL answered before is refused
IDEMPOTENCY_KEY_REUSED; the first request's own retry must still get its stored answer, not that
refusal: SQL's unique (merchant, key) is the last word on whose the key is, not the
merchant-wide claim the refused request wrote into the rebuilt Redis."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.generated.medwallet.v1 import common_pb2
from tests.harness import Harness, lose_redis, new_id
from tests.test_authorization_rules import (
    APPROVED,
    COLLECTOR,
    HOSPITAL,
    MEDICAL,
    authorize_request,
    family,
    figures,
    register_merchants,
)


@pytest.mark.single_redis
def test_a_refused_other_request_does_not_take_the_key_from_the_first_after_redis_loss(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    people = family(registry, relationships, 50_000)
    (relationship_id,) = people.relationship_ids
    key = new_id("key")
    request = authorize_request(people.beneficiary_id, MEDICAL, 10_000, idempotency_key=key)
    first = authorizations.Authorize(request, metadata=HOSPITAL)
    assert first.decision == APPROVED
    lose_redis(harness)  # the hold is put back from SQL; the key's records are gone
    other = authorize_request(people.beneficiary_id, MEDICAL, 7_000, idempotency_key=key)
    with pytest.raises(grpc.RpcError) as refused:
        authorizations.Authorize(other, metadata=HOSPITAL)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # The till that was approved retries its own request: its answer, as first given.
    again = authorizations.Authorize(request, metadata=HOSPITAL)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
    assert figures(relationships, relationship_id) == (40_000, 10_000, 0)


@pytest.mark.single_redis
def test_a_paid_premium_retried_after_a_refused_other_request_is_told_it_was_paid(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    people = family(registry, relationships, 50_000)
    (relationship_id,) = people.relationship_ids
    key = new_id("key")
    premium = common_pb2.PURPOSE_RESIDENT_PREMIUM
    request = authorize_request(
        people.beneficiary_id, premium, 10_000, capture=True, idempotency_key=key
    )
    first = authorizations.Authorize(request, metadata=COLLECTOR)
    assert first.status == pb.AUTHORIZATION_STATUS_CAPTURED
    lose_redis(harness)
    other = authorize_request(
        people.beneficiary_id, premium, 9_000, capture=True, idempotency_key=key
    )
    with pytest.raises(grpc.RpcError) as refused:
        authorizations.Authorize(other, metadata=COLLECTOR)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    again = authorizations.Authorize(request, metadata=COLLECTOR)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
    assert figures(relationships, relationship_id) == (40_000, 0, 10_000)
