"""A ReleaseQuota (quota back to the holder's personal account) takes the money from Redis
first, then commits SQL. When the SQL part fails without a refusal, or its call is cancelled
while SQL runs, the Redis debit is given back only if SQL does not have the release: before, a
release whose COMMIT went through (its reply lost, or committed after the client's deadline)
was credited back, so Redis showed the released money as still available and the family could
spend it a second time (found by an audit; the deadline and lost-reply tests fail on the old
code)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from authz_server.domain.errors import Unavailable
from authz_server.generated.medwallet.v1 import relationship_pb2
from authz_server.service.quota_sync import restore_from_ledger
from authz_server.storage.redis import keys
from tests.harness import APP, Harness, new_id
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import family


def release_request(relationship_id: str, key: str) -> relationship_pb2.ReleaseQuotaRequest:
    return relationship_pb2.ReleaseQuotaRequest(
        relationship_id=relationship_id, amount_fen=8_000, idempotency_key=key
    )


def redis_agrees_with_sql(harness: Harness, fam: Any, unused_fen: int) -> None:
    (relationship_id,) = fam.relationship_ids
    assert ledger(harness, relationship_id).unused_fen == unused_fen
    assert sum(hot_figures(harness, fam.beneficiary_id, relationship_id)) == unused_fen


class FailingOnce:
    """The release's database: its second transaction (the first is the read-only precheck,
    the second the release itself, which takes the Redis debit) does its work and then fails as
    a lost connection does: after its COMMIT (`commits`, the reply lost) or before it (rolled
    back). Every other transaction is real."""

    def __init__(self, real: Any, *, commits: bool) -> None:
        self.real = real
        self.commits = commits
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def run(self, work: Any) -> Any:
        self.calls += 1
        if self.calls != 2:
            return await self.real.run(work)
        if self.commits:
            await self.real.run(work)
            raise Unavailable("the database did not answer: server closed the connection")

        def rolled_back(session: Any) -> Any:
            work(session)
            raise Unavailable("the database did not answer: server closed the connection")

        return await self.real.run(rolled_back)


@pytest.fixture()
def service(harness: Harness) -> Iterator[Any]:
    service = harness.app.relationships
    real_database, real_clock = service.database, service.clock
    yield service
    service.database, service.clock = real_database, real_clock


def test_a_release_committed_after_its_deadline_is_not_given_back(
    harness: Harness, registry: Any, relationships: Any, service: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    real_clock = service.clock

    def slow_clock() -> Any:  # read inside the release's transaction, after the Redis debit
        time.sleep(1.0)
        return real_clock()

    service.clock = slow_clock
    key = new_id("release")
    with pytest.raises(grpc.RpcError) as gave_up:
        relationships.ReleaseQuota(release_request(relationship_id, key), metadata=APP, timeout=0.3)
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The transaction commits meanwhile (its call was cancelled long before), and the release
    # then ends as SQL says.
    for _ in range(100):
        if ledger(harness, relationship_id).unused_fen == 12_000:
            break
        time.sleep(0.05)
    harness.run(service.to_the_end.finished())
    service.clock = real_clock
    redis_agrees_with_sql(harness, fam, 12_000)
    # the till's retry gets the first answer, and nothing moves again
    again = relationships.ReleaseQuota(release_request(relationship_id, key), metadata=APP)
    assert again.relationship.available_fen == 12_000
    redis_agrees_with_sql(harness, fam, 12_000)


def test_a_release_whose_reply_was_lost_answers_ok_and_is_not_given_back(
    harness: Harness, registry: Any, relationships: Any, service: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    service.database = FailingOnce(service.database, commits=True)
    answer = relationships.ReleaseQuota(release_request(relationship_id, new_id("r")), metadata=APP)
    assert answer.relationship.available_fen == 12_000
    redis_agrees_with_sql(harness, fam, 12_000)


def test_a_release_that_never_committed_is_given_back_and_answers_unavailable(
    harness: Harness, registry: Any, relationships: Any, service: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    service.database = FailingOnce(service.database, commits=False)
    with pytest.raises(grpc.RpcError) as failed:
        relationships.ReleaseQuota(release_request(relationship_id, new_id("r")), metadata=APP)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    redis_agrees_with_sql(harness, fam, 20_000)


class RedisLossBeforeTheGiveBack:
    """Redis loses the quota (a failover without its last writes) while the release runs, and the
    quota is rebuilt from SQL before the release's give-back arrives."""

    def __init__(self, real: Any, harness: Harness) -> None:
        self.real = real
        self.harness = harness

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def give_back(
        self, beneficiary_id: str, relationship_id: str, fen: int, epoch: str
    ) -> None:
        await self.harness.app.redis.delete(keys.quota(beneficiary_id, relationship_id))
        await restore_from_ledger(self.harness.app.database, self.real, relationship_id)
        await self.real.give_back(beneficiary_id, relationship_id, fen, epoch)


def test_a_give_back_after_redis_lost_and_rebuilt_the_quota_is_dropped(
    harness: Harness, registry: Any, relationships: Any, service: Any
) -> None:
    """A rebuilt quota must not take the epoch of the lost one (a counter started again at the
    same value, and the give-back was added on top of SQL's figure: found by an audit)."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    service.database = FailingOnce(service.database, commits=False)
    real_quotas = service.quotas
    service.quotas = RedisLossBeforeTheGiveBack(real_quotas, harness)
    try:
        with pytest.raises(grpc.RpcError) as failed:
            relationships.ReleaseQuota(release_request(relationship_id, new_id("r")), metadata=APP)
    finally:
        service.quotas = real_quotas
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    redis_agrees_with_sql(harness, fam, 20_000)
