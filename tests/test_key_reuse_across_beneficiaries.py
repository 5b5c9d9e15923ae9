"""An idempotency key is unique per merchant: reusing it for another beneficiary is refused at
once (not only noticed later), also when both requests race, and also after Redis lost data."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.generated.medwallet.v1 import common_pb2
from tests import factories
from tests.harness import lose_redis, new_id
from tests.test_authorization_rules import HOSPITAL, authorize_request, family, figures
from tests.test_authorization_rules import register_merchants as register


def _medical(beneficiary_id: str, key: str) -> pb.AuthorizeRequest:
    return authorize_request(
        beneficiary_id, common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET, 5_000, idempotency_key=key
    )


def _refused_as_reused(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert factories.error_info(refused.value).reason == "IDEMPOTENCY_KEY_REUSED"


def test_key_reused_for_another_beneficiary_is_refused(
    registry, relationships, authorizations
) -> None:
    register(registry)
    first, second = family(registry, relationships, 20_000), family(registry, relationships, 20_000)
    key = new_id("till")
    answer = authorizations.Authorize(_medical(first.beneficiary_id, key), metadata=HOSPITAL)
    assert answer.decision == pb.DECISION_APPROVED
    _refused_as_reused(
        lambda: authorizations.Authorize(_medical(second.beneficiary_id, key), metadata=HOSPITAL)
    )
    assert figures(relationships, second.relationship_ids[0]) == (20_000, 0, 0)
    # The first request's retry still gets its answer.
    again = authorizations.Authorize(_medical(first.beneficiary_id, key), metadata=HOSPITAL)
    assert again.SerializeToString() == answer.SerializeToString()


def test_racing_requests_under_one_key_one_wins(registry, relationships, authorizations) -> None:
    register(registry)
    families = [family(registry, relationships, 20_000) for _ in range(6)]
    key = new_id("race")

    def attempt(beneficiary_id: str) -> str:
        try:
            authorizations.Authorize(_medical(beneficiary_id, key), metadata=HOSPITAL)
            return "approved"
        except grpc.RpcError as error:
            assert factories.error_info(error).reason == "IDEMPOTENCY_KEY_REUSED"
            return "refused"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(attempt, [f.beneficiary_id for f in families]))
    assert sorted(outcomes) == ["approved"] + ["refused"] * 5
    held = [figures(relationships, f.relationship_ids[0])[1] for f in families]
    assert sorted(held) == [0] * 5 + [5_000]


def test_reuse_is_still_refused_after_redis_lost_its_data(
    harness, registry, relationships, authorizations
) -> None:
    register(registry)
    first, second = family(registry, relationships, 20_000), family(registry, relationships, 20_000)
    key = new_id("flushed")
    authorizations.Authorize(_medical(first.beneficiary_id, key), metadata=HOSPITAL)
    lose_redis(harness)
    _refused_as_reused(
        lambda: authorizations.Authorize(_medical(second.beneficiary_id, key), metadata=HOSPITAL)
    )
