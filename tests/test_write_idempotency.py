"""Idempotent writes against the running service: CreditPersonalAccount, AllocateQuota and
ReleaseQuota. Same key and same body: the first answer again, byte for byte, and the money moved
once. Same key, another body: ALREADY_EXISTS / IDEMPOTENCY_KEY_REUSED and nothing moved. Every
movement leaves exactly one ledger row."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from authz_server.domain.errors import Unavailable
from authz_server.domain.types import LedgerKind
from authz_server.generated.medwallet.v1 import registry_pb2, relationship_pb2
from authz_server.storage.sql.tables import LedgerEntryRow
from tests import factories
from tests.harness import ADMIN, APP, WINDOW, Harness, new_id

THREADS = 20


def key_reused(call: Callable[[], Any]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS, caught.value.details()
    assert factories.error_info(caught.value).reason == "IDEMPOTENCY_KEY_REUSED"


def ledger_rows(harness: Harness, holder_id: str) -> list[tuple[str, str | None, int]]:
    rows = harness.app.database.transaction(
        lambda session: session.execute(
            select(LedgerEntryRow.kind, LedgerEntryRow.relationship_id, LedgerEntryRow.amount_fen)
            .where(LedgerEntryRow.holder_id == holder_id)
            .order_by(LedgerEntryRow.entry_id)
        ).all()
    )
    return [tuple(row) for row in rows]


def ledger_balance(harness: Harness, holder_id: str) -> int:
    sign = {
        LedgerKind.ACCOUNT_CREDIT.value: 1,
        LedgerKind.QUOTA_ALLOCATION.value: -1,
        LedgerKind.QUOTA_RELEASE.value: 1,
        LedgerKind.DISSOLUTION_RETURN.value: 1,
    }
    return sum(sign[kind] * amount for kind, _, amount in ledger_rows(harness, holder_id))


def credit_request(participant_id: str, amount_fen: int, key: str):
    return registry_pb2.CreditPersonalAccountRequest(
        participant_id=participant_id, amount_fen=amount_fen, idempotency_key=key
    )


def allocate_request(relationship_id: str, amount_fen: int, key: str):
    return relationship_pb2.AllocateQuotaRequest(
        relationship_id=relationship_id, amount_fen=amount_fen, idempotency_key=key
    )


def release_request(relationship_id: str, amount_fen: int, key: str):
    return relationship_pb2.ReleaseQuotaRequest(
        relationship_id=relationship_id, amount_fen=amount_fen, idempotency_key=key
    )


def concurrently(call: Callable[[], Any]) -> list[bytes]:
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(call) for _ in range(THREADS)]
        return [future.result().SerializeToString() for future in futures]


# --- CreditPersonalAccount -----------------------------------------------------------------


def test_credit_retry_answers_the_first_answer_and_credits_once(harness, registry) -> None:
    holder = factories.employee(registry)
    key = new_id("credit")
    first = registry.CreditPersonalAccount(credit_request(holder, 12_345, key), metadata=ADMIN)
    assert first.balance_fen == 12_345 and first.ledger_entry_id > 0
    # Money arriving with another key in between does not change the retry's answer.
    registry.CreditPersonalAccount(credit_request(holder, 5, new_id("credit")), metadata=ADMIN)
    again = registry.CreditPersonalAccount(credit_request(holder, 12_345, key), metadata=ADMIN)
    assert again.SerializeToString() == first.SerializeToString()
    assert factories.balance(registry, holder) == 12_350
    assert [row[0] for row in ledger_rows(harness, holder)] == ["ACCOUNT_CREDIT"] * 2
    assert ledger_balance(harness, holder) == 12_350


def test_credit_key_reused_with_another_body_is_refused(harness, registry) -> None:
    holder, other = factories.employee(registry), factories.employee(registry)
    key = new_id("credit")
    registry.CreditPersonalAccount(credit_request(holder, 1_000, key), metadata=ADMIN)
    key_reused(
        lambda: registry.CreditPersonalAccount(credit_request(holder, 1_001, key), metadata=ADMIN)
    )
    key_reused(
        lambda: registry.CreditPersonalAccount(credit_request(other, 1_000, key), metadata=ADMIN)
    )
    assert (factories.balance(registry, holder), factories.balance(registry, other)) == (1_000, 0)
    assert len(ledger_rows(harness, holder)) == 1 and ledger_rows(harness, other) == []


def test_concurrent_credit_retries_credit_once(harness, registry) -> None:
    holder = factories.employee(registry)
    request = credit_request(holder, 777, new_id("credit"))
    answers = concurrently(lambda: registry.CreditPersonalAccount(request, metadata=ADMIN))
    assert len(set(answers)) == 1
    assert factories.balance(registry, holder) == 777
    assert len(ledger_rows(harness, holder)) == 1


def test_credit_to_a_resident_is_refused(registry) -> None:
    resident = factories.resident(registry)
    with pytest.raises(grpc.RpcError) as caught:
        registry.CreditPersonalAccount(credit_request(resident, 1, new_id("c")), metadata=ADMIN)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert factories.error_info(caught.value).reason == "NO_PERSONAL_ACCOUNT"


# --- AllocateQuota -------------------------------------------------------------------------


def test_allocate_retry_answers_the_first_answer_and_moves_once(
    harness, registry, relationships
) -> None:
    holder = factories.employee(registry, 50_000)
    rid = factories.active_relationship(relationships, holder, factories.resident(registry))
    request = allocate_request(rid, 20_000, new_id("alloc"))
    first = relationships.AllocateQuota(request, metadata=APP)
    assert first.holder_balance_fen == 30_000
    assert (first.relationship.allocated_fen, first.relationship.available_fen) == (20_000, 20_000)

    # Other moves in between; the retry still answers what the first call answered.
    relationships.AllocateQuota(allocate_request(rid, 1_000, new_id("alloc")), metadata=APP)
    relationships.ReleaseQuota(release_request(rid, 500, new_id("rel")), metadata=APP)
    for metadata in (APP, WINDOW):  # a retry may come through another channel
        again = relationships.AllocateQuota(request, metadata=metadata)
        assert again.SerializeToString() == first.SerializeToString()

    assert factories.balance(registry, holder) == 50_000 - 20_500
    shown = factories.relationship(relationships, rid)
    assert (shown.allocated_fen, shown.available_fen) == (20_500, 20_500)
    kinds = [(kind, amount) for kind, _, amount in ledger_rows(harness, holder)]
    assert kinds == [
        ("ACCOUNT_CREDIT", 50_000),
        ("QUOTA_ALLOCATION", 20_000),
        ("QUOTA_ALLOCATION", 1_000),
        ("QUOTA_RELEASE", 500),
    ]
    assert ledger_balance(harness, holder) == factories.balance(registry, holder)


def test_allocate_key_reused_with_another_body_is_refused(harness, registry, relationships) -> None:
    holder = factories.employee(registry, 50_000)
    rid = factories.active_relationship(relationships, holder, factories.resident(registry))
    other = factories.active_relationship(relationships, holder, factories.resident(registry))
    key = new_id("alloc")
    relationships.AllocateQuota(allocate_request(rid, 10_000, key), metadata=APP)
    key_reused(lambda: relationships.AllocateQuota(allocate_request(rid, 9_999, key), metadata=APP))
    key_reused(
        lambda: relationships.AllocateQuota(allocate_request(other, 10_000, key), metadata=APP)
    )
    assert factories.balance(registry, holder) == 40_000
    assert factories.relationship(relationships, rid).available_fen == 10_000
    assert factories.relationship(relationships, other).allocated_fen == 0
    assert len(ledger_rows(harness, holder)) == 2


def test_refused_allocation_is_not_remembered(registry, relationships) -> None:
    """A refusal stores no answer: once the balance suffices, the same key goes through."""
    holder = factories.employee(registry, 100)
    rid = factories.active_relationship(relationships, holder, factories.resident(registry))
    request = allocate_request(rid, 500, new_id("alloc"))
    with pytest.raises(grpc.RpcError) as caught:
        relationships.AllocateQuota(request, metadata=APP)
    assert factories.error_info(caught.value).reason == "INSUFFICIENT_BALANCE"
    registry.CreditPersonalAccount(credit_request(holder, 400, new_id("c")), metadata=ADMIN)
    assert relationships.AllocateQuota(request, metadata=APP).holder_balance_fen == 0
    assert relationships.AllocateQuota(request, metadata=APP).holder_balance_fen == 0
    assert factories.relationship(relationships, rid).available_fen == 500


def test_concurrent_allocate_retries_move_money_once(harness, registry, relationships) -> None:
    """More than half the balance: a retry that debited again would be refused for want of
    balance instead of getting the first answer."""
    holder = factories.employee(registry, 10_000)
    rid = factories.active_relationship(relationships, holder, factories.resident(registry))
    request = allocate_request(rid, 6_000, new_id("alloc"))
    answers = concurrently(lambda: relationships.AllocateQuota(request, metadata=APP))
    assert len(set(answers)) == 1
    answer = relationship_pb2.AllocateQuotaResponse.FromString(answers[0])
    assert answer.holder_balance_fen == 4_000
    assert factories.balance(registry, holder) == 4_000
    shown = factories.relationship(relationships, rid)
    assert (shown.allocated_fen, shown.available_fen) == (6_000, 6_000)
    assert [kind for kind, _, _ in ledger_rows(harness, holder)].count("QUOTA_ALLOCATION") == 1


def test_keys_are_scoped_per_operation(registry, relationships) -> None:
    holder = factories.employee(registry)
    key = new_id("shared")
    registry.CreditPersonalAccount(credit_request(holder, 9_000, key), metadata=ADMIN)
    rid = factories.active_relationship(relationships, holder, factories.resident(registry))
    relationships.AllocateQuota(allocate_request(rid, 6_000, key), metadata=APP)
    relationships.ReleaseQuota(release_request(rid, 2_000, key), metadata=APP)
    assert factories.balance(registry, holder) == 5_000
    assert factories.relationship(relationships, rid).available_fen == 4_000


# --- ReleaseQuota --------------------------------------------------------------------------


def test_release_retry_answers_the_first_answer_and_moves_once(
    harness, registry, relationships
) -> None:
    holder = factories.employee(registry, 10_000)
    rid = factories.active_relationship(relationships, holder, factories.resident(registry), 8_000)
    request = release_request(rid, 3_000, new_id("rel"))
    first = relationships.ReleaseQuota(request, metadata=APP)
    assert first.holder_balance_fen == 5_000
    assert (first.relationship.allocated_fen, first.relationship.available_fen) == (5_000, 5_000)
    # Even when a replay would no longer fit the quota, it answers and moves nothing.
    relationships.ReleaseQuota(release_request(rid, 5_000, new_id("rel")), metadata=APP)
    again = relationships.ReleaseQuota(request, metadata=APP)
    assert again.SerializeToString() == first.SerializeToString()
    assert factories.balance(registry, holder) == 10_000
    shown = factories.relationship(relationships, rid)
    assert (shown.allocated_fen, shown.available_fen) == (0, 0)
    releases = [a for kind, _, a in ledger_rows(harness, holder) if kind == "QUOTA_RELEASE"]
    assert releases == [3_000, 5_000]
    assert ledger_balance(harness, holder) == 10_000


def test_release_key_reused_with_another_body_is_refused(harness, registry, relationships) -> None:
    holder = factories.employee(registry, 10_000)
    rid = factories.active_relationship(relationships, holder, factories.resident(registry), 8_000)
    key = new_id("rel")
    relationships.ReleaseQuota(release_request(rid, 1_000, key), metadata=APP)
    key_reused(lambda: relationships.ReleaseQuota(release_request(rid, 2_000, key), metadata=APP))
    assert factories.balance(registry, holder) == 3_000
    shown = factories.relationship(relationships, rid)
    assert (shown.allocated_fen, shown.available_fen) == (7_000, 7_000)
    assert len(ledger_rows(harness, holder)) == 3


def test_concurrent_release_retries_move_money_once(harness, registry, relationships) -> None:
    """More than half the quota: a retry that debited the quota again would be refused
    (INSUFFICIENT_QUOTA) instead of getting the first answer."""
    holder = factories.employee(registry, 10_000)
    rid = factories.active_relationship(relationships, holder, factories.resident(registry), 6_000)
    request = release_request(rid, 4_000, new_id("rel"))
    answers = concurrently(lambda: relationships.ReleaseQuota(request, metadata=APP))
    assert len(set(answers)) == 1
    assert factories.balance(registry, holder) == 8_000
    shown = factories.relationship(relationships, rid)
    assert (shown.allocated_fen, shown.available_fen) == (2_000, 2_000)
    assert [kind for kind, _, _ in ledger_rows(harness, holder)].count("QUOTA_RELEASE") == 1
    # Redis was given back every concurrent debit that lost: the whole rest can be released.
    final = relationships.ReleaseQuota(release_request(rid, 2_000, new_id("rel")), metadata=APP)
    assert final.holder_balance_fen == 10_000
    assert ledger_balance(harness, holder) == 10_000


def test_an_allocation_whose_redis_credit_was_lost_is_credited_by_its_retry(
    harness, registry, relationships
) -> None:
    """The allocation committed in SQL, its Redis credit failed (a timeout: the caller gets
    UNAVAILABLE and retries): the quota is set from the ledger before that answer, and the
    retry's replay sets it so too, so the family can spend what it allocated at once, not after
    the rolling reconcile reaches the quota (an audit note: payments declined
    INSUFFICIENT_QUOTA on money SQL holds until then)."""
    holder = factories.employee(registry, 50_000)
    rid = factories.active_relationship(relationships, holder, factories.resident(registry), 1_000)
    quotas = harness.app.relationships.quotas
    real_credit = quotas.credit

    async def lost(*arguments: Any) -> bool:
        # What the quota cache raises for a Redis timeout (storage/redis/quota_cache.guarded).
        raise Unavailable("the quota store did not answer: TimeoutError")

    quotas.credit = lost
    request = allocate_request(rid, 20_000, new_id("alloc"))
    try:
        with pytest.raises(grpc.RpcError) as failed:
            relationships.AllocateQuota(request, metadata=APP)
    finally:
        quotas.credit = real_credit
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    # Set from the ledger before the caller heard UNAVAILABLE (was 1,000, understated until
    # the retry); the retry's replay does not count it twice.
    assert factories.relationship(relationships, rid).available_fen == 21_000
    again = relationships.AllocateQuota(request, metadata=APP)
    assert again.holder_balance_fen == 50_000 - 1_000 - 20_000
    shown = factories.relationship(relationships, rid)
    assert (shown.allocated_fen, shown.available_fen) == (21_000, 21_000)
    assert [kind for kind, _, _ in ledger_rows(harness, holder)].count("QUOTA_ALLOCATION") == 2
