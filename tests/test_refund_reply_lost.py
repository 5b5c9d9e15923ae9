"""A Refund commits in SQL first (the refunds' group commit), then credits each quota it goes
back to in Redis. Two lost replies left quotas short in Redis of money the ledger had given back
(payments declined on it) until the till's retry or the rolling reconcile reached them:
- the batch's COMMIT went through but its reply was lost (the connection dropped: the till sees
  UNAVAILABLE): no credit was sent;
- a split payment's refund whose first credit ran but whose reply was lost (a timeout): the
  loop stopped there, and the other quotas' credits were never sent.
Now a refund whose transaction failed without a refusal sets the quotas it credits from the
ledger (under their row locks: right whether or not it committed), and a credit that failed has
its quota set from the ledger while the others are still sent (found by an audit of the refunds;
both tests fail before)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from authz_server.domain.errors import Unavailable
from tests.harness import Harness, new_id
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import (
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    funding,
    refund,
    register_merchants,
)


class CommitReplyLost:
    """The refunds' group commit: once armed, the next refund submitted is written and committed
    with its batch, and its caller then hears what a lost connection answers (the COMMIT's reply
    lost). Every batch is real."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def submit(self, work: Any, lock_key: str | None = None) -> Any:
        failing, self.armed = self.armed, False
        result = await self.real.submit(work, lock_key=lock_key)
        if failing:
            raise Unavailable("the database did not answer: server closed the connection")
        return result


class CreditReplyLost:
    """The refunds' quota cache: its first credit runs in the real Redis and its reply is then
    lost, as a timeout loses it (guarded() answers Unavailable). Everything else is real."""

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


@pytest.fixture()
def lossy_commit(harness: Harness) -> Iterator[CommitReplyLost]:
    refunds: Any = harness.app.authorizations.refunds
    real = refunds.group_commit
    wrapped = CommitReplyLost(real)
    refunds.group_commit = wrapped
    try:
        yield wrapped
    finally:
        refunds.group_commit = real


@pytest.fixture()
def lossy_credit(harness: Harness) -> Iterator[CreditReplyLost]:
    refunds: Any = harness.app.authorizations.refunds
    real = refunds.quotas
    wrapped = CreditReplyLost(real)
    refunds.quotas = wrapped
    try:
        yield wrapped
    finally:
        refunds.quotas = real


def redis_sum(harness: Harness, beneficiary_id: str, relationship_id: str) -> int:
    return sum(hot_figures(harness, beneficiary_id, relationship_id))


def test_a_refund_whose_commit_reply_was_lost_is_in_redis_too(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    lossy_commit: CommitReplyLost,
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 50_000)
    (relationship_id,) = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 30_000)
    capture(authorizations, HOSPITAL, answer.authorization_id, 20_000)
    assert redis_sum(harness, fam.beneficiary_id, relationship_id) == 30_000

    key = new_id("refund")
    lossy_commit.armed = True
    with pytest.raises(grpc.RpcError) as failed:
        refund(authorizations, HOSPITAL, answer.authorization_id, 5_000, key)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ledger(harness, relationship_id).unused_fen == 35_000  # SQL has the refund
    # before: 30,000 (the 5,000 refunded declined to the family until a retry or reconcile)
    assert redis_sum(harness, fam.beneficiary_id, relationship_id) == 35_000

    # the till's retry is answered as SQL has it, and credits nothing twice
    again = refund(authorizations, HOSPITAL, answer.authorization_id, 5_000, key)
    assert again.authorization.refunded_amount_fen == 5_000
    assert redis_sum(harness, fam.beneficiary_id, relationship_id) == 35_000


def test_a_split_refund_whose_first_credit_reply_was_lost_credits_the_other_quota(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    lossy_credit: CreditReplyLost,
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 10_000, 10_000)
    first, second = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    assert funding(answer.funding) == [(first, 10_000), (second, 5_000)]
    capture(authorizations, HOSPITAL, answer.authorization_id)

    # last-drawn first: 5,000 to the second quota (its reply lost), then 10,000 to the first
    key = new_id("refund")
    with pytest.raises(grpc.RpcError) as failed:
        refund(authorizations, HOSPITAL, answer.authorization_id, 15_000, key)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert lossy_credit.lost == 1
    assert [ledger(harness, rid).unused_fen for rid in (first, second)] == [10_000, 10_000]
    # before: [0, 10,000] (the first quota's credit never sent: 10,000 declined to the family
    # until a retry or the rolling reconcile)
    assert [redis_sum(harness, fam.beneficiary_id, rid) for rid in (first, second)] == [
        10_000,
        10_000,
    ]

    again = refund(authorizations, HOSPITAL, answer.authorization_id, 15_000, key)
    assert again.authorization.refunded_amount_fen == 15_000
    assert [redis_sum(harness, fam.beneficiary_id, rid) for rid in (first, second)] == [
        10_000,
        10_000,
    ]
