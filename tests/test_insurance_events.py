"""POLICY.md rules 7 and 8 against the running service: an insurance event that ends or moves a
person's insurance dissolves every relationship of that person at once, unused quota going back
to each holder; repeating the event is a no-op; a new relationship can be made once both
qualify again."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from authz_server.domain.errors import Unavailable
from authz_server.domain.types import LedgerKind
from authz_server.generated.medwallet.v1 import (
    common_pb2,
    registry_pb2,
    relationship_pb2,
)
from authz_server.storage.sql.tables import LedgerEntryRow, RelationshipEventRow
from tests import factories
from tests.harness import ADMIN, APP, Harness, new_id
from tests.test_authorization_recovery import hot_figures

TERMINATED = registry_pb2.INSURANCE_EVENT_TYPE_TERMINATED
TRANSFERRED = registry_pb2.INSURANCE_EVENT_TYPE_TRANSFERRED
REINSTATED = registry_pb2.INSURANCE_EVENT_TYPE_REINSTATED
ACTIVE = common_pb2.RELATIONSHIP_STATUS_ACTIVE
PENDING = common_pb2.RELATIONSHIP_STATUS_PENDING_CONSENT
DISSOLVED = common_pb2.RELATIONSHIP_STATUS_DISSOLVED
NEW_REGION = "310100"

EVENTS = {
    "retirement": dict(
        event_type=TERMINATED, termination_reason=registry_pb2.TERMINATION_REASON_RETIREMENT
    ),
    "death": dict(event_type=TERMINATED, termination_reason=registry_pb2.TERMINATION_REASON_DEATH),
    "withdrawal": dict(
        event_type=TERMINATED, termination_reason=registry_pb2.TERMINATION_REASON_WITHDRAWAL
    ),
    "transfer": dict(event_type=TRANSFERRED, new_pooling_region=NEW_REGION),
}
REASONS = {
    (TERMINATED, "holder"): common_pb2.DISSOLUTION_REASON_HOLDER_TERMINATED,
    (TERMINATED, "beneficiary"): common_pb2.DISSOLUTION_REASON_BENEFICIARY_TERMINATED,
    (TRANSFERRED, "holder"): common_pb2.DISSOLUTION_REASON_HOLDER_TRANSFERRED,
    (TRANSFERRED, "beneficiary"): common_pb2.DISSOLUTION_REASON_BENEFICIARY_TRANSFERRED,
}


def report(
    registry: Any, participant_id: str, **event: Any
) -> registry_pb2.ReportInsuranceEventResponse:
    return registry.ReportInsuranceEvent(
        registry_pb2.ReportInsuranceEventRequest(participant_id=participant_id, **event),
        metadata=ADMIN,
    )


def policy_refused(call: Callable[[], Any], reason: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    assert factories.error_info(caught.value).reason == reason


def propose(relationships: Any, holder_id: str, beneficiary_id: str) -> str:
    return relationships.ProposeRelationship(
        relationship_pb2.ProposeRelationshipRequest(
            holder_id=holder_id, beneficiary_id=beneficiary_id, relation=common_pb2.RELATION_SPOUSE
        ),
        metadata=APP,
    ).relationship.relationship_id


def allocate(relationships: Any, relationship_id: str, amount_fen: int) -> int:
    return relationships.AllocateQuota(
        relationship_pb2.AllocateQuotaRequest(
            relationship_id=relationship_id, amount_fen=amount_fen, idempotency_key=new_id("a")
        ),
        metadata=APP,
    ).holder_balance_fen


def returned_in_ledger(harness: Harness, relationship_id: str) -> int:
    return harness.app.database.transaction(
        lambda session: session.scalar(
            select(func.coalesce(func.sum(LedgerEntryRow.amount_fen), 0)).where(
                LedgerEntryRow.relationship_id == relationship_id,
                LedgerEntryRow.kind == LedgerKind.DISSOLUTION_RETURN.value,
            )
        )
    )


def last_event(harness: Harness, relationship_id: str) -> tuple[Any, ...]:
    row = harness.app.database.transaction(
        lambda session: session.execute(
            select(
                RelationshipEventRow.event, RelationshipEventRow.party, RelationshipEventRow.channel
            )
            .where(RelationshipEventRow.relationship_id == relationship_id)
            .order_by(RelationshipEventRow.event_id.desc())
            .limit(1)
        ).one()
    )
    return tuple(row)


@dataclass
class Family:
    """A small web of relationships around two people the events are reported for.

    holder (employee, 100_000) -> relative   ACTIVE, 30_000 allocated
    holder                     -> in_law     PENDING
    parent (employee, 50_000)  -> holder     ACTIVE, 20_000 allocated (holder is also a beneficiary)
    stranger (employee, 40_000)-> relative   ACTIVE, 10_000 allocated
    stranger                   -> in_law     ACTIVE,  5_000 allocated
    """

    holder: str
    relative: str
    in_law: str
    parent: str
    stranger: str
    holder_to_relative: str
    holder_to_in_law: str
    parent_to_holder: str
    stranger_to_relative: str
    stranger_to_in_law: str

    def balances(self, registry: Any) -> dict[str, int]:
        return {
            person: factories.balance(registry, person)
            for person in (self.holder, self.parent, self.stranger)
        }


def family(registry: Any, relationships: Any) -> Family:
    holder = factories.employee(registry, 100_000)
    relative, in_law = factories.resident(registry), factories.resident(registry)
    parent, stranger = factories.employee(registry, 50_000), factories.employee(registry, 40_000)
    active = factories.active_relationship
    return Family(
        holder=holder,
        relative=relative,
        in_law=in_law,
        parent=parent,
        stranger=stranger,
        holder_to_relative=active(relationships, holder, relative, 30_000),
        holder_to_in_law=propose(relationships, holder, in_law),
        parent_to_holder=active(relationships, parent, holder, 20_000, common_pb2.RELATION_CHILD),
        stranger_to_relative=active(relationships, stranger, relative, 10_000),
        stranger_to_in_law=active(relationships, stranger, in_law, 5_000),
    )


@pytest.mark.parametrize("event_name", list(EVENTS))
@pytest.mark.parametrize("side", ["holder", "beneficiary"])
def test_event_dissolves_every_relationship_of_that_person(
    harness, registry, relationships, event_name, side
) -> None:
    event = EVENTS[event_name]
    kind = event["event_type"]
    world = family(registry, relationships)
    before = world.balances(registry)
    assert before == {world.holder: 70_000, world.parent: 30_000, world.stranger: 25_000}

    if side == "holder":
        # The holder shares with two people and is also a parent's beneficiary.
        person = world.holder
        expected = {
            world.holder_to_relative: (REASONS[kind, "holder"], 30_000, world.holder),
            world.holder_to_in_law: (REASONS[kind, "holder"], 0, world.holder),
            world.parent_to_holder: (REASONS[kind, "beneficiary"], 20_000, world.parent),
        }
        untouched = [world.stranger_to_relative, world.stranger_to_in_law]
    else:
        person = world.relative
        expected = {
            world.holder_to_relative: (REASONS[kind, "beneficiary"], 30_000, world.holder),
            world.stranger_to_relative: (REASONS[kind, "beneficiary"], 10_000, world.stranger),
        }
        untouched = [world.holder_to_in_law, world.parent_to_holder, world.stranger_to_in_law]
    untouched_before = {rid: factories.relationship(relationships, rid) for rid in untouched}

    answer = report(registry, person, **event)
    assert sorted(answer.dissolved_relationship_ids) == sorted(expected)
    assert answer.returned_fen == sum(fen for _, fen, _ in expected.values())
    if kind == TERMINATED:
        assert answer.participant.status == common_pb2.PARTICIPANT_STATUS_TERMINATED
    else:
        assert answer.participant.status == common_pb2.PARTICIPANT_STATUS_ACTIVE
        assert answer.participant.pooling_region == NEW_REGION

    for rid, (reason, returned, _) in expected.items():
        shown = factories.relationship(relationships, rid)
        assert (shown.status, shown.dissolution_reason) == (DISSOLVED, reason)
        assert (shown.allocated_fen, shown.available_fen, shown.held_fen) == (0, 0, 0)
        assert shown.HasField("dissolved_at")
        assert returned_in_ledger(harness, rid) == returned
        assert last_event(harness, rid) == ("DISSOLVED", None, "SYSTEM")
        policy_refused(lambda rid=rid: allocate(relationships, rid, 1), "RELATIONSHIP_NOT_ACTIVE")
    for rid, shown in untouched_before.items():
        assert factories.relationship(relationships, rid) == shown

    after = world.balances(registry)
    returned_to = {holder: 0 for holder in before}
    for _, fen, holder in expected.values():
        returned_to[holder] += fen
    assert after == {holder: before[holder] + returned_to[holder] for holder in before}
    if side == "holder":
        assert answer.participant.balance_fen == 100_000

    # The same event again changes nothing and moves no money.
    repeated = report(registry, person, **event)
    assert (list(repeated.dissolved_relationship_ids), repeated.returned_fen) == ([], 0)
    assert repeated.participant.status == answer.participant.status
    assert world.balances(registry) == after
    for rid in expected:
        assert returned_in_ledger(harness, rid) == expected[rid][1]
    for rid, shown in untouched_before.items():
        assert factories.relationship(relationships, rid) == shown


def test_event_for_a_person_without_relationships_only_changes_the_person(registry) -> None:
    lonely = factories.resident(registry)
    answer = report(registry, lonely, **EVENTS["death"])
    assert (list(answer.dissolved_relationship_ids), answer.returned_fen) == ([], 0)
    assert answer.participant.status == common_pb2.PARTICIPANT_STATUS_TERMINATED


def test_transfer_to_the_current_region_changes_nothing(registry, relationships) -> None:
    holder = factories.employee(registry, 10_000, region="110100")
    rid = factories.active_relationship(relationships, holder, factories.resident(registry), 4_000)
    answer = report(registry, holder, event_type=TRANSFERRED, new_pooling_region="110100")
    assert (list(answer.dissolved_relationship_ids), answer.returned_fen) == ([], 0)
    assert factories.relationship(relationships, rid).status == ACTIVE
    assert factories.balance(registry, holder) == 6_000


def test_terminated_holder_can_share_again_after_reinstatement(registry, relationships) -> None:
    holder, relative = factories.employee(registry, 10_000), factories.resident(registry)
    first = factories.active_relationship(relationships, holder, relative, 8_000)
    report(registry, holder, **EVENTS["retirement"])
    assert factories.balance(registry, holder) == 10_000
    policy_refused(lambda: propose(relationships, holder, relative), "PARTICIPANT_NOT_ACTIVE")

    reinstated = report(registry, holder, event_type=REINSTATED)
    assert reinstated.participant.status == common_pb2.PARTICIPANT_STATUS_ACTIVE
    assert list(reinstated.dissolved_relationship_ids) == []
    # Reinstating twice is a no-op too.
    assert report(registry, holder, event_type=REINSTATED).participant == reinstated.participant

    second = factories.active_relationship(relationships, holder, relative, 10_000)
    assert second != first
    shown = factories.relationship(relationships, second)
    assert (shown.status, shown.allocated_fen, shown.available_fen) == (ACTIVE, 10_000, 10_000)
    assert factories.balance(registry, holder) == 0
    assert factories.relationship(relationships, first).status == DISSOLVED


def test_terminated_beneficiary_can_be_supported_again_after_reinstatement(
    registry, relationships
) -> None:
    holder, relative = factories.employee(registry, 5_000), factories.resident(registry)
    factories.active_relationship(relationships, holder, relative, 5_000)
    report(registry, relative, **EVENTS["withdrawal"])
    policy_refused(lambda: propose(relationships, holder, relative), "PARTICIPANT_NOT_ACTIVE")
    # A resident may come back as an employee, in another region; then they may even hold.
    report(
        registry,
        relative,
        event_type=REINSTATED,
        new_scheme=common_pb2.SCHEME_EMPLOYEE,
        new_pooling_region="440300",
    )
    again = factories.active_relationship(relationships, holder, relative, 5_000)
    assert factories.relationship(relationships, again).available_fen == 5_000
    assert propose(relationships, relative, holder)


@pytest.mark.parametrize("side", ["holder", "beneficiary"])
def test_transferred_person_can_share_again_at_once(registry, relationships, side) -> None:
    holder, relative = factories.employee(registry, 9_000), factories.resident(registry)
    first = factories.active_relationship(relationships, holder, relative, 9_000)
    moved = holder if side == "holder" else relative
    answer = report(registry, moved, event_type=TRANSFERRED, new_pooling_region="510100")
    assert list(answer.dissolved_relationship_ids) == [first]
    assert answer.returned_fen == 9_000
    second = factories.active_relationship(relationships, holder, relative, 9_000)
    assert factories.relationship(relationships, second).status == ACTIVE
    assert factories.balance(registry, holder) == 0


def test_terminated_person_cannot_transfer(registry) -> None:
    person = factories.resident(registry)
    report(registry, person, **EVENTS["death"])
    policy_refused(
        lambda: report(registry, person, event_type=TRANSFERRED, new_pooling_region=NEW_REGION),
        "PARTICIPANT_NOT_ACTIVE",
    )


class RedisStepFails:
    """The registry's quota cache: its first dissolve fails, as when Redis does not answer."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def dissolve(self, beneficiary_id: str, relationship_id: str) -> None:
        if not self.failed:
            self.failed = True
            raise Unavailable("the quota store did not answer: (injected)")
        await self.real.dissolve(beneficiary_id, relationship_id)


def test_a_repeated_event_dissolves_in_redis_what_the_first_left_undone(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    """The event committed in SQL but its Redis step failed: the quota still looked active in
    Redis (holds placed on it could never be captured; split payments declined wrongly). The
    reporting system's retry of the same event now finishes the Redis step."""
    holder = factories.employee(registry, balance_fen=50_000)
    beneficiary = factories.employee(registry)
    relationship_id = factories.active_relationship(relationships, holder, beneficiary, 20_000)
    service = harness.app.registry
    failing = RedisStepFails(service.quotas)
    service.quotas = failing
    try:
        with pytest.raises(grpc.RpcError) as failed:
            report(registry, beneficiary, **EVENTS["retirement"])
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert hot_figures(harness, beneficiary, relationship_id) == (20_000, 0)  # still there
        again = report(registry, beneficiary, **EVENTS["retirement"])
    finally:
        service.quotas = failing.real
    assert list(again.dissolved_relationship_ids) == []  # nothing new in SQL
    assert hot_figures(harness, beneficiary, relationship_id) == (0, 0)
    assert factories.relationship(relationships, relationship_id).status == DISSOLVED
