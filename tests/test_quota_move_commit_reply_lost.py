"""A DissolveRelationship commits in SQL first (the quota's unused money back to the holder's
personal account), then marks the quota dissolved in Redis. When the transaction's COMMIT went
through but its reply was lost (the connection dropped: the caller sees UNAVAILABLE), the Redis
step was skipped: the quota stayed active in Redis with the money the ledger had just given
back, and Authorize approved payments on it (each capture then refused by the ledger,
RELATIONSHIP_NOT_ACTIVE: the till told APPROVED for money that was not there) until the rolling
reconcile's dissolutions cursor came by five minutes or more later, or a retry. Now a dissolve
whose transaction failed without a refusal asks SQL, under the row lock, and runs the Redis step
when SQL has the dissolution. Likewise an AllocateQuota (SQL first, then the Redis credit) whose
COMMIT reply was lost left its money out of Redis (payments declined on it) until the channel
retried or the rolling reconcile came by: it now sets the quota from the ledger before it
answers UNAVAILABLE (found by an audit of the quota moves; both tests fail before)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from authz_server.domain.errors import Unavailable
from authz_server.generated.medwallet.v1 import relationship_pb2
from authz_server.storage.redis import keys
from tests.harness import APP, Harness, new_id
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import (
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize,
    dissolve,
    family,
    register_merchants,
)


class CommitReplyLost:
    """The relationship service's database: once `armed` (n > 0), its n-th transaction from
    then on (a dissolve's first; an allocation's second, after its read-only precheck) commits
    and then fails as a lost connection does (the COMMIT's reply lost). Every other transaction
    is real."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.armed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def run(self, work: Any) -> Any:
        failing = self.armed == 1
        self.armed = max(0, self.armed - 1)
        result = await self.real.run(work)
        if failing:
            raise Unavailable("the database did not answer: server closed the connection")
        return result


@pytest.fixture()
def lossy(harness: Harness) -> Iterator[CommitReplyLost]:
    service: Any = harness.app.relationships
    real_database = service.database
    wrapped = CommitReplyLost(real_database)
    service.database = wrapped
    try:
        yield wrapped
    finally:
        service.database = real_database


def test_a_dissolve_whose_commit_reply_was_lost_is_dissolved_in_redis_too(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    lossy: CommitReplyLost,
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    lossy.armed = 1
    with pytest.raises(grpc.RpcError) as failed:
        dissolve(relationships, relationship_id)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ledger(harness, relationship_id).unused_fen == 0  # SQL gave it back to the holder

    quota = keys.quota(fam.beneficiary_id, relationship_id)
    status = harness.run(harness.app.quotas.commands.execute("HGET", quota, "status"))
    assert status == b"DISSOLVED"  # was ACTIVE, 20,000 available
    # no approval on money the ledger returned to the holder
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 5_000)
    assert answer.decision == DECLINED


def test_an_allocation_whose_commit_reply_was_lost_is_in_redis_too(
    harness: Harness, registry: Any, relationships: Any, lossy: CommitReplyLost
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    lossy.armed = 2  # the precheck, then the allocation itself
    with pytest.raises(grpc.RpcError) as failed:
        relationships.AllocateQuota(
            relationship_pb2.AllocateQuotaRequest(
                relationship_id=relationship_id, amount_fen=5_000, idempotency_key=new_id("a")
            ),
            metadata=APP,
        )
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ledger(harness, relationship_id).unused_fen == 25_000  # SQL has it
    # before: 20,000 (the 5,000 declined to the family until a retry or the rolling reconcile)
    assert sum(hot_figures(harness, fam.beneficiary_id, relationship_id)) == 25_000


class CreditReplyLost:
    """The relationship service's quota cache: its first credit runs in the real Redis and its
    reply is then lost, as a timeout loses it (guarded() answers Unavailable)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def credit(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int, entry_id: int
    ) -> bool:
        done: bool = await self.real.credit(beneficiary_id, relationship_id, amount_fen, entry_id)
        if self.lost == 0:
            self.lost += 1
            raise Unavailable("the quota store did not answer: TimeoutError")
        return done


def test_an_allocation_whose_credit_reply_was_lost_is_in_redis_once(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    """The allocation committed; its Redis credit ran but its answer was lost: the caller hears
    UNAVAILABLE, and Redis holds the allocation once (its entry mark), whether or not the
    credit ran, not short of it until the channel's retry (found by an audit of the refunds,
    which had the same gap; fails before when the credit did not run)."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    service: Any = harness.app.relationships
    real_quotas = service.quotas
    wrapped = CreditReplyLost(real_quotas)

    async def credit_not_run(
        beneficiary_id: str, relationship_id: str, amount_fen: int, entry_id: int
    ) -> bool:
        wrapped.lost += 1
        raise Unavailable("the quota store did not answer: TimeoutError")

    for lost_before_running in (False, True):
        wrapped.lost = 0
        if lost_before_running:  # the script never reached Redis
            wrapped.credit = credit_not_run  # type: ignore[method-assign]
        service.quotas = wrapped
        try:
            with pytest.raises(grpc.RpcError) as failed:
                relationships.AllocateQuota(
                    relationship_pb2.AllocateQuotaRequest(
                        relationship_id=relationship_id,
                        amount_fen=5_000,
                        idempotency_key=new_id("a"),
                    ),
                    metadata=APP,
                )
        finally:
            service.quotas = real_quotas
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert wrapped.lost == 1
        unused = ledger(harness, relationship_id).unused_fen
        assert sum(hot_figures(harness, fam.beneficiary_id, relationship_id)) == unused
    assert ledger(harness, relationship_id).unused_fen == 30_000
