"""A ReleaseQuota takes its money from Redis first (quota_debit.lua), under the relationship's
row lock, then commits SQL. When the debit's reply is lost (a timeout: Redis ran the script, the
caller saw UNAVAILABLE), the release's transaction ends at the debit, SQL never has the release,
and nothing gave the money back: Redis understated the quota by the release's amount (payments
declined on money SQL holds) until the rolling reconcile reached it, and the channel's retry
under the same key was debited a second time (or refused INSUFFICIENT_QUOTA when the first debit
took what was free). Now a release whose debit may have run without its answer sets the quota
from the ledger, under the row lock, before it answers UNAVAILABLE; and one whose transaction
rolled back while the channel's retry committed the release (two debits, one release) sets it
from the ledger too, instead of only answering the retry's stored answer (found by an audit of
the quota moves; each test fails before)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from authz_server.domain.errors import Unavailable
from authz_server.generated.medwallet.v1 import relationship_pb2
from authz_server.service.ports import Debit
from tests.harness import APP, Harness, new_id
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import family


class DebitReplyLost:
    """The release's quota cache: its first debit runs in the real Redis and its reply is then
    lost, as a timeout loses it (guarded() answers Unavailable). Everything else is real."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def debit(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int
    ) -> Debit | None:
        taken: Debit | None = await self.real.debit(beneficiary_id, relationship_id, amount_fen)
        if self.lost == 0:
            self.lost += 1
            raise Unavailable("the quota store did not answer: TimeoutError")
        return taken


@pytest.fixture()
def lossy(harness: Harness) -> Iterator[DebitReplyLost]:
    service: Any = harness.app.relationships
    real_quotas = service.quotas
    wrapped = DebitReplyLost(real_quotas)
    service.quotas = wrapped
    try:
        yield wrapped
    finally:
        service.quotas = real_quotas


def release(relationships: Any, relationship_id: str, fen: int, key: str) -> Any:
    return relationships.ReleaseQuota(
        relationship_pb2.ReleaseQuotaRequest(
            relationship_id=relationship_id, amount_fen=fen, idempotency_key=key
        ),
        metadata=APP,
    )


def redis_sum(harness: Harness, fam: Any) -> int:
    (relationship_id,) = fam.relationship_ids
    return sum(hot_figures(harness, fam.beneficiary_id, relationship_id))


def test_a_release_whose_debit_reply_was_lost_leaves_redis_as_sql_says(
    harness: Harness, registry: Any, relationships: Any, lossy: DebitReplyLost
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    key = new_id("release")
    with pytest.raises(grpc.RpcError) as failed:
        release(relationships, relationship_id, 8_000, key)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert lossy.lost == 1
    # SQL has no release; Redis must not have taken it either (it showed 12,000: 8,000 of the
    # family's money declined for nothing)
    assert ledger(harness, relationship_id).unused_fen == 20_000
    assert redis_sum(harness, fam) == 20_000

    # the channel's retry moves the money once
    again = release(relationships, relationship_id, 8_000, key)
    assert again.relationship.available_fen == 12_000
    assert ledger(harness, relationship_id).unused_fen == 12_000
    assert redis_sum(harness, fam) == 12_000  # not 4,000: debited twice, released once


def test_a_retried_release_of_everything_free_is_not_refused_after_a_lost_debit_reply(
    harness: Harness, registry: Any, relationships: Any, lossy: DebitReplyLost
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    key = new_id("release")
    with pytest.raises(grpc.RpcError) as failed:
        release(relationships, relationship_id, 20_000, key)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    # the retry: before, INSUFFICIENT_QUOTA (Redis had 0 free, SQL 20,000 unused)
    again = release(relationships, relationship_id, 20_000, key)
    assert again.relationship.available_fen == 0
    assert ledger(harness, relationship_id).unused_fen == 0
    assert redis_sum(harness, fam) == 0


class RetriedWhileRolledBack:
    """The release's database: its second transaction (the release itself, after the read-only
    precheck) takes the Redis debit and is then rolled back as a lost connection does. Before the
    call's next transaction (its look at what SQL has) the channel's retry under the same key is
    made and committed: the first call's deadline had passed, and the retry waited for its row
    lock. Every transaction is real."""

    def __init__(self, real: Any, retry: Any) -> None:
        self.real = real
        self.retry = retry
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def run(self, work: Any) -> Any:
        self.calls += 1
        if self.calls == 2:

            def rolled_back(session: Any) -> Any:
                work(session)
                raise Unavailable("the database did not answer: server closed the connection")

            return await self.real.run(rolled_back)
        if self.calls == 3:  # the retry, on a thread of its own (its own transactions: 4, 5)
            await asyncio.to_thread(self.retry)
        return await self.real.run(work)


def test_a_release_rolled_back_and_retried_before_it_read_sql_is_debited_once(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    key = new_id("release")
    answers: list[Any] = []
    service: Any = harness.app.relationships
    real_database = service.database
    service.database = RetriedWhileRolledBack(
        real_database, lambda: answers.append(release(relationships, relationship_id, 8_000, key))
    )
    try:
        first = release(relationships, relationship_id, 8_000, key)
    finally:
        service.database = real_database
    # the first call is answered as SQL has the key: the retry's release
    assert first.relationship.available_fen == answers[0].relationship.available_fen
    assert ledger(harness, relationship_id).unused_fen == 12_000
    # before: 4,000 (both calls' debits taken, one release in SQL, nothing given back)
    assert redis_sum(harness, fam) == 12_000
