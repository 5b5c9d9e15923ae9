"""A one-step payment (capture at once) retried after Redis lost its key's record, when the
key's first decision is in SQL's journal but paid nothing (a decline, say: its answer was lost
on the way, so the till retries). Redis, without the record, decides anew; before, the payment
was then captured in SQL and only afterwards did the journal find the key's first decision, so
the till was answered that decision (DECLINED) with the family charged. The capture batch now
reads the journal's decision for the key too, and pays nothing (storage/sql/capture_batch.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from tests.harness import Harness, new_id
from tests.test_authorization_rules import (
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize_request,
    family,
    figures,
    register_merchants,
)
from tests.test_insurance_events import allocate


def redis_lost_the_key(harness: Harness, key: str) -> None:
    """Redis lost the key's records (its decision's and the merchant-wide claim), as after a
    rebuild, which does not copy idempotency records back."""
    client = harness.admin()
    try:
        lost = list(client.scan_iter(match=f"*{key}*"))
        assert lost
        client.delete(*lost)
    finally:
        client.close()


def test_a_declined_payment_retried_after_redis_lost_its_key_pays_nothing(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 10_000)
    (relationship_id,) = fam.relationship_ids
    request = authorize_request(
        fam.beneficiary_id, MEDICAL, 15_000, idempotency_key=new_id("pay"), capture=True
    )
    first = authorizations.Authorize(request, metadata=HOSPITAL)
    assert first.decision == DECLINED
    allocate(relationships, relationship_id, 10_000)  # it would be paid now
    redis_lost_the_key(harness, request.idempotency_key)

    again = authorizations.Authorize(request, metadata=HOSPITAL)
    assert again.SerializeToString() == first.SerializeToString()  # the key's first answer
    assert figures(relationships, relationship_id) == (20_000, 0, 0)  # and nothing paid


def test_a_payment_with_a_key_sql_holds_for_another_request_pays_nothing(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """The merchant reused a key (a till's bug) after Redis lost its record: the key's first
    decision, a hold, is in the journal only (a hold writes no payment record)."""
    register_merchants(registry)
    fam = family(registry, relationships, 30_000)
    (relationship_id,) = fam.relationship_ids
    key = new_id("key")
    hold = authorizations.Authorize(
        authorize_request(fam.beneficiary_id, MEDICAL, 5_000, idempotency_key=key),
        metadata=HOSPITAL,
    )
    assert hold.status == pb.AUTHORIZATION_STATUS_PENDING
    redis_lost_the_key(harness, key)

    payment = authorize_request(
        fam.beneficiary_id, MEDICAL, 7_000, idempotency_key=key, capture=True
    )
    with pytest.raises(grpc.RpcError) as reused:
        authorizations.Authorize(payment, metadata=HOSPITAL)
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert figures(relationships, relationship_id) == (25_000, 5_000, 0)  # the hold; no payment
