"""An insurance event (ReportInsuranceEvent: TERMINATED, TRANSFERRED) commits its dissolutions in
SQL first (each quota's unused money back to its holder), then marks each quota dissolved in
Redis. Two lost replies left quotas active in Redis with the money the ledger had just given
back, and Authorize approved payments on it (each capture then refused by the ledger,
RELATIONSHIP_NOT_ACTIVE: the till told APPROVED for money that was not there) until the caller
repeated the event or the rolling reconcile's dissolutions cursor came by, five minutes or more
later:
- the transaction's COMMIT went through but its reply was lost (the connection dropped: the
  caller sees UNAVAILABLE): no quota was dissolved in Redis;
- the Redis step of one quota ran but its reply was lost (a timeout): the loop stopped there,
  and the person's other quotas were never dissolved in Redis.
Now an event whose transaction failed without a refusal asks SQL, under the person's row lock,
and dissolves in Redis what SQL has dissolved; and every quota's Redis step is tried, the first
failure answered once all were (found by an audit of the registry; both tests fail before)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from authz_server.domain.errors import Unavailable
from authz_server.generated.medwallet.v1 import registry_pb2
from authz_server.storage.redis import keys
from tests.harness import ADMIN, Harness
from tests.test_authorization_recovery import ledger
from tests.test_authorization_rules import (
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize,
    family,
    register_merchants,
)


def death(registry: Any, participant_id: str) -> registry_pb2.ReportInsuranceEventResponse:
    answer: registry_pb2.ReportInsuranceEventResponse = registry.ReportInsuranceEvent(
        registry_pb2.ReportInsuranceEventRequest(
            participant_id=participant_id,
            event_type=registry_pb2.INSURANCE_EVENT_TYPE_TERMINATED,
            termination_reason=registry_pb2.TERMINATION_REASON_DEATH,
        ),
        metadata=ADMIN,
    )
    return answer


def status_in_redis(harness: Harness, beneficiary_id: str, relationship_id: str) -> Any:
    quota = keys.quota(beneficiary_id, relationship_id)
    return harness.run(harness.app.quotas.commands.execute("HGET", quota, "status"))


class CommitReplyLost:
    """The registry's database: once armed, its next transaction commits and then fails as a
    lost connection does (the COMMIT's reply lost). Every other transaction is real."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def run(self, work: Any) -> Any:
        failing, self.armed = self.armed, False
        result = await self.real.run(work)
        if failing:
            raise Unavailable("the database did not answer: server closed the connection")
        return result


class DissolveReplyLost:
    """The registry's quota cache: its first dissolve runs in the real Redis and its reply is
    then lost, as a timeout loses it (guarded() answers Unavailable). Everything else is real."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def dissolve(self, beneficiary_id: str, relationship_id: str) -> None:
        await self.real.dissolve(beneficiary_id, relationship_id)
        if self.lost == 0:
            self.lost += 1
            raise Unavailable("the quota store did not answer: TimeoutError")


@pytest.fixture()
def lossy_database(harness: Harness) -> Iterator[CommitReplyLost]:
    service: Any = harness.app.registry
    real_database = service.database
    wrapped = CommitReplyLost(real_database)
    service.database = wrapped
    try:
        yield wrapped
    finally:
        service.database = real_database


@pytest.fixture()
def lossy_quotas(harness: Harness) -> Iterator[DissolveReplyLost]:
    service: Any = harness.app.registry
    real_quotas = service.quotas
    wrapped = DissolveReplyLost(real_quotas)
    service.quotas = wrapped
    try:
        yield wrapped
    finally:
        service.quotas = real_quotas


def test_an_event_whose_commit_reply_was_lost_dissolves_its_quotas_in_redis_too(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    lossy_database: CommitReplyLost,
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    (holder_id,) = fam.holder_ids
    lossy_database.armed = True
    with pytest.raises(grpc.RpcError) as failed:
        death(registry, holder_id)  # the holder died: the relative's quota goes back
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ledger(harness, relationship_id).unused_fen == 0  # SQL gave it back to the holder

    # before: ACTIVE, 20,000 available, until a repeat of the event or the dissolutions cursor
    assert status_in_redis(harness, fam.beneficiary_id, relationship_id) == b"DISSOLVED"
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 5_000)
    assert answer.decision == DECLINED  # no approval on money returned to the dead holder

    # the caller's repeat changes nothing
    again = death(registry, holder_id)
    assert list(again.dissolved_relationship_ids) == []
    assert status_in_redis(harness, fam.beneficiary_id, relationship_id) == b"DISSOLVED"


def test_an_event_whose_first_redis_dissolve_reply_was_lost_dissolves_the_others(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    lossy_quotas: DissolveReplyLost,
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 10_000, 20_000, 30_000)
    with pytest.raises(grpc.RpcError) as failed:
        death(registry, fam.beneficiary_id)  # every relationship of the beneficiary dissolved
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert lossy_quotas.lost == 1
    for relationship_id in fam.relationship_ids:
        assert ledger(harness, relationship_id).unused_fen == 0
    # before: only the first (in relationship id order) DISSOLVED, the others ACTIVE with their
    # money until a repeat of the event or the dissolutions cursor
    assert [
        status_in_redis(harness, fam.beneficiary_id, relationship_id)
        for relationship_id in fam.relationship_ids
    ] == [b"DISSOLVED"] * 3
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 5_000)
    assert answer.decision == DECLINED
