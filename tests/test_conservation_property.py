"""Property: a holder's money is conserved to the fen through any sequence of operations.

A Hypothesis state machine drives random sequences through the real gRPC stubs: credits,
proposals and consents to several relatives, allocations, releases (sometimes more than there
is), dissolutions, insurance events on the holder or a relative, and retries with the same
idempotency key (same body, and another body). A plain-Python model predicts every answer and
every refusal; after every step the service must agree with it, and

    holder balance + sum over the holder's relationships of (available + held + spent)
        == everything ever credited to the holder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from authz_server.generated.medwallet.v1 import common_pb2, registry_pb2, relationship_pb2
from tests import factories
from tests.harness import ADMIN, APP, WINDOW, bearer, new_id

REGIONS = ["110100", "310100", "440300"]
RELATIONS = [
    common_pb2.RELATION_SPOUSE,
    common_pb2.RELATION_PARENT,
    common_pb2.RELATION_CHILD,
    common_pb2.RELATION_SIBLING,
    common_pb2.RELATION_GRANDPARENT,
    common_pb2.RELATION_GRANDCHILD,
]
CHANNELS = [APP, WINDOW, bearer("test-platform")]
TERMINATION_REASONS = [
    registry_pb2.TERMINATION_REASON_RETIREMENT,
    registry_pb2.TERMINATION_REASON_DEATH,
    registry_pb2.TERMINATION_REASON_WITHDRAWAL,
]
PENDING = common_pb2.RELATIONSHIP_STATUS_PENDING_CONSENT
ACTIVE = common_pb2.RELATIONSHIP_STATUS_ACTIVE
DISSOLVED = common_pb2.RELATIONSHIP_STATUS_DISSOLVED
HOLDER = common_pb2.PARTY_HOLDER
BENEFICIARY = common_pb2.PARTY_BENEFICIARY
FAILED = grpc.StatusCode.FAILED_PRECONDITION

# A pick of an element from a list that may grow: taken modulo its length.
PICK = st.integers(min_value=0, max_value=1_000_000)
# Fen beyond what is there: mostly none (a share of what is there is asked for instead).
OVER = st.sampled_from([0, 0, 0, 1, 100_000])


@dataclass
class Person:
    participant_id: str
    scheme: int
    region: str
    active: bool = True


@dataclass
class Rel:
    relationship_id: str
    beneficiary: str
    relation: int
    status: int = PENDING
    holder_consented: bool = False
    beneficiary_consented: bool = False
    quota: int = 0
    reason: int = common_pb2.DISSOLUTION_REASON_UNSPECIFIED


@dataclass
class Replay:
    """An idempotent call and its first answer (None while it was refused)."""

    request: Any
    answer: bytes | None = None


@dataclass
class Keys:
    credit: list[Replay] = field(default_factory=list)
    allocate: list[Replay] = field(default_factory=list)
    release: list[Replay] = field(default_factory=list)


def refused(call: Callable[[], Any], code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    assert factories.error_info(caught.value).reason == reason
    event(f"refused: {reason}")  # shown by --hypothesis-show-statistics


def machine(registry, relationships) -> type[RuleBasedStateMachine]:
    class Conservation(RuleBasedStateMachine):
        """The model: one holder, a few relatives, the holder's relationships to them."""

        holder: Person
        relatives: list[Person]
        rels: list[Rel]
        balance: int
        credited: int
        keys: Keys

        # ------------------------------------------------------------ helpers

        def person(self, participant_id: str) -> Person:
            if participant_id == self.holder.participant_id:
                return self.holder
            return next(p for p in self.relatives if p.participant_id == participant_id)

        def check_relationship(self, shown: relationship_pb2.Relationship, rel: Rel) -> None:
            assert shown.relationship_id == rel.relationship_id
            assert shown.holder_id == self.holder.participant_id
            assert shown.beneficiary_id == rel.beneficiary
            assert shown.relation == rel.relation
            assert shown.status == rel.status
            assert (shown.holder_consented, shown.beneficiary_consented) == (
                rel.holder_consented,
                rel.beneficiary_consented,
            )
            assert (shown.available_fen, shown.held_fen, shown.spent_fen) == (rel.quota, 0, 0)
            assert shown.allocated_fen == rel.quota
            assert shown.dissolution_reason == rel.reason

        def check_participant(self, shown: registry_pb2.Participant, person: Person) -> None:
            assert shown.participant_id == person.participant_id
            assert shown.scheme == person.scheme
            assert shown.pooling_region == person.region
            assert shown.status == (
                common_pb2.PARTICIPANT_STATUS_ACTIVE
                if person.active
                else common_pb2.PARTICIPANT_STATUS_TERMINATED
            )
            if person is self.holder:
                assert shown.balance_fen == self.balance

        def open_rels(self, participant_id: str) -> list[Rel]:
            return [
                r
                for r in self.rels
                if r.status != DISSOLVED
                and participant_id in (self.holder.participant_id, r.beneficiary)
            ]

        def chosen(self, pick: int, with_quota: bool = False) -> Rel:
            """Mostly an active relationship (with quota, if asked) when there is one;
            otherwise any, so that refusals are exercised too."""
            active = [r for r in self.rels if r.status == ACTIVE and (r.quota or not with_quota)]
            if active and pick % 4 != 3:
                return active[(pick // 4) % len(active)]
            return self.rels[pick % len(self.rels)]

        def dissolve_in_model(self, rel: Rel, reason: int) -> int:
            returned = rel.quota
            self.balance += returned
            rel.quota = 0
            rel.status = DISSOLVED
            rel.reason = reason
            return returned

        # ------------------------------------------------------------ setup

        @initialize(
            schemes=st.lists(
                st.sampled_from([common_pb2.SCHEME_RESIDENT, common_pb2.SCHEME_EMPLOYEE]),
                min_size=2,
                max_size=4,
            ),
            opening=st.integers(min_value=0, max_value=200_000),
        )
        def setup(self, schemes: list[int], opening: int) -> None:
            self.holder = Person(factories.employee(registry), common_pb2.SCHEME_EMPLOYEE, "110100")
            self.relatives = []
            for scheme in schemes:
                region = REGIONS[len(self.relatives) % len(REGIONS)]
                if scheme == common_pb2.SCHEME_EMPLOYEE:
                    relative = factories.employee(registry, region=region)
                else:
                    relative = factories.resident(registry, region=region)
                self.relatives.append(Person(relative, scheme, region))
            self.rels = []
            self.balance = self.credited = 0
            self.keys = Keys()
            if opening:
                self.credit(opening)

        # ------------------------------------------------------------ money in

        @rule(amount=st.integers(min_value=1, max_value=60_000))
        def credit(self, amount: int) -> None:
            request = registry_pb2.CreditPersonalAccountRequest(
                participant_id=self.holder.participant_id,
                amount_fen=amount,
                idempotency_key=new_id("credit"),
            )
            answer = registry.CreditPersonalAccount(request, metadata=ADMIN)
            # A terminated employee keeps the account: money still arrives in it.
            self.balance += amount
            self.credited += amount
            assert answer.balance_fen == self.balance
            self.keys.credit.append(Replay(request, answer.SerializeToString()))

        # ------------------------------------------------------------ relationships

        @rule(pick=PICK, relation=st.sampled_from(RELATIONS), channel=st.sampled_from(CHANNELS))
        def propose(self, pick: int, relation: int, channel: Any) -> None:
            """Mostly to a relative the holder does not share with yet; sometimes to anyone."""
            free = [p for p in self.relatives if p.active and not self.open_rels(p.participant_id)]
            if free and pick % 4 != 3 and self.holder.active:
                relative = free[(pick // 4) % len(free)]
            else:
                relative = self.relatives[pick % len(self.relatives)]

            def call() -> Any:
                return relationships.ProposeRelationship(
                    relationship_pb2.ProposeRelationshipRequest(
                        holder_id=self.holder.participant_id,
                        beneficiary_id=relative.participant_id,
                        relation=relation,
                    ),
                    metadata=channel,
                )

            if not self.holder.active or not relative.active:
                refused(call, FAILED, "PARTICIPANT_NOT_ACTIVE")
            elif self.open_rels(relative.participant_id):
                refused(call, FAILED, "DUPLICATE_RELATIONSHIP")
            else:
                shown = call().relationship
                rel = Rel(shown.relationship_id, relative.participant_id, relation)
                self.rels.append(rel)
                self.check_relationship(shown, rel)

        @rule(
            pick=PICK,
            relation=st.sampled_from(RELATIONS),
            beneficiary_first=st.booleans(),
            quota=st.integers(min_value=0, max_value=80_000),
            give_back=st.integers(min_value=0, max_value=100),
        )
        def establish(
            self, pick: int, relation: int, beneficiary_first: bool, quota: int, give_back: int
        ) -> None:
            """Propose, both consents (in either order), an allocation and a release of
            `give_back` percent of it, as a user would."""
            count = len(self.rels)
            self.propose(pick, relation, APP)
            if len(self.rels) == count:
                return
            parties = [BENEFICIARY, HOLDER] if beneficiary_first else [HOLDER, BENEFICIARY]
            for party in parties:
                self.consent(count, party)
            rel = self.rels[count]
            if quota:
                self.allocate_amount(rel, quota)
            if rel.quota and give_back:
                self.release_amount(rel, max(1, rel.quota * give_back // 100))

        @precondition(lambda self: self.rels)
        @rule(pick=PICK, party=st.sampled_from([HOLDER, BENEFICIARY]))
        def consent(self, pick: int, party: int) -> None:
            rel = self.rels[pick % len(self.rels)]

            def call() -> Any:
                return relationships.ConsentRelationship(
                    relationship_pb2.ConsentRelationshipRequest(
                        relationship_id=rel.relationship_id, party=party
                    ),
                    metadata=APP,
                )

            already = rel.holder_consented if party == HOLDER else rel.beneficiary_consented
            if already and rel.status != DISSOLVED:
                self.check_relationship(call().relationship, rel)  # a retry: unchanged
            elif rel.status != PENDING:
                refused(call, FAILED, "RELATIONSHIP_NOT_PENDING")
            elif not self.holder.active or not self.person(rel.beneficiary).active:
                refused(call, FAILED, "PARTICIPANT_NOT_ACTIVE")
            else:
                if party == HOLDER:
                    rel.holder_consented = True
                else:
                    rel.beneficiary_consented = True
                if rel.holder_consented and rel.beneficiary_consented:
                    rel.status = ACTIVE
                self.check_relationship(call().relationship, rel)

        # ------------------------------------------------------------ quota

        def quota_refusal(self, rel: Rel) -> str | None:
            if rel.status != ACTIVE:
                return "RELATIONSHIP_NOT_ACTIVE"
            if not self.holder.active:
                return "PARTICIPANT_NOT_ACTIVE"
            return None

        def do_allocate(self, replay: Replay) -> None:
            request = replay.request
            rel = next(r for r in self.rels if r.relationship_id == request.relationship_id)

            def call() -> Any:
                return relationships.AllocateQuota(request, metadata=APP)

            reason = self.quota_refusal(rel)
            if reason is None and request.amount_fen > self.balance:
                reason = "INSUFFICIENT_BALANCE"
            if reason is not None:
                refused(call, FAILED, reason)
                return
            answer = call()
            self.balance -= request.amount_fen
            rel.quota += request.amount_fen
            assert answer.holder_balance_fen == self.balance
            self.check_relationship(answer.relationship, rel)
            replay.answer = answer.SerializeToString()
            event("allocated")

        def do_release(self, replay: Replay) -> None:
            request = replay.request
            rel = next(r for r in self.rels if r.relationship_id == request.relationship_id)

            def call() -> Any:
                return relationships.ReleaseQuota(request, metadata=APP)

            reason = self.quota_refusal(rel)
            if reason is None and request.amount_fen > rel.quota:
                reason = "INSUFFICIENT_QUOTA"
            if reason is not None:
                refused(call, FAILED, reason)
                return
            answer = call()
            self.balance += request.amount_fen
            rel.quota -= request.amount_fen
            assert answer.holder_balance_fen == self.balance
            self.check_relationship(answer.relationship, rel)
            replay.answer = answer.SerializeToString()
            event("released")

        @precondition(lambda self: self.rels)
        @rule(pick=PICK, percent=st.integers(min_value=0, max_value=100), over=OVER)
        def allocate(self, pick: int, percent: int, over: int) -> None:
            """`over` > 0 asks for that many fen more than the holder's balance."""
            amount = self.balance + over if over else max(1, self.balance * percent // 100)
            self.allocate_amount(self.chosen(pick), amount)

        def allocate_amount(self, rel: Rel, amount: int) -> None:
            replay = Replay(
                relationship_pb2.AllocateQuotaRequest(
                    relationship_id=rel.relationship_id,
                    amount_fen=amount,
                    idempotency_key=new_id("alloc"),
                )
            )
            self.keys.allocate.append(replay)
            self.do_allocate(replay)

        @precondition(lambda self: self.rels)
        @rule(
            pick=PICK,
            percent=st.integers(min_value=0, max_value=100),
            over=OVER,
        )
        def release(self, pick: int, percent: int, over: int) -> None:
            """`over` > 0 asks for that many fen more than the quota holds."""
            rel = self.chosen(pick, with_quota=True)
            self.release_amount(
                rel, rel.quota + over if over else max(1, rel.quota * percent // 100)
            )

        def release_amount(self, rel: Rel, amount: int) -> None:
            replay = Replay(
                relationship_pb2.ReleaseQuotaRequest(
                    relationship_id=rel.relationship_id,
                    amount_fen=amount,
                    idempotency_key=new_id("release"),
                )
            )
            self.keys.release.append(replay)
            self.do_release(replay)

        @rule(
            scope=st.sampled_from(["credit", "allocate", "release"]),
            pick=PICK,
            other_body=st.booleans(),
        )
        def retry(self, scope: str, pick: int, other_body: bool) -> None:
            """The same key again: the same body answers the first answer byte for byte (even
            if things changed since); another body is ALREADY_EXISTS. A key whose first call was
            refused was not spent: the retry is served as a first call."""
            replays: list[Replay] = getattr(self.keys, scope)
            if not replays:
                return
            replay = replays[pick % len(replays)]
            stub, method = {
                "credit": (registry, "CreditPersonalAccount"),
                "allocate": (relationships, "AllocateQuota"),
                "release": (relationships, "ReleaseQuota"),
            }[scope]
            metadata = ADMIN if scope == "credit" else APP
            if replay.answer is None:
                if scope == "allocate":
                    self.do_allocate(replay)
                elif scope == "release":
                    self.do_release(replay)
                return
            if other_body:
                changed = type(replay.request)()
                changed.CopyFrom(replay.request)
                changed.amount_fen += 1
                refused(
                    lambda: getattr(stub, method)(changed, metadata=metadata),
                    grpc.StatusCode.ALREADY_EXISTS,
                    "IDEMPOTENCY_KEY_REUSED",
                )
            else:
                answer = getattr(stub, method)(replay.request, metadata=metadata)
                assert answer.SerializeToString() == replay.answer
                event(f"replayed {scope}")

        @precondition(lambda self: self.rels)
        @rule(pick=PICK, party=st.sampled_from([HOLDER, BENEFICIARY]))
        def dissolve(self, pick: int, party: int) -> None:
            rel = self.chosen(pick)
            answer = relationships.DissolveRelationship(
                relationship_pb2.DissolveRelationshipRequest(
                    relationship_id=rel.relationship_id, party=party
                ),
                metadata=WINDOW,
            )
            returned = 0
            if rel.status != DISSOLVED:
                returned = self.dissolve_in_model(rel, common_pb2.DISSOLUTION_REASON_VOLUNTARY)
            if returned:
                event("dissolved with quota")
            assert answer.returned_fen == returned
            self.check_relationship(answer.relationship, rel)

        # ------------------------------------------------------------ insurance events

        @rule(
            pick=PICK,
            kind=st.sampled_from(["TERMINATED", "TRANSFERRED", "REINSTATED"]),
            termination_reason=st.sampled_from(TERMINATION_REASONS),
            region=st.sampled_from(REGIONS),
            with_region=st.booleans(),
        )
        def insurance_event(
            self, pick: int, kind: str, termination_reason: int, region: str, with_region: bool
        ) -> None:
            everyone = [self.holder, *self.relatives]
            person = everyone[pick % len(everyone)]
            as_holder = person is self.holder
            request = registry_pb2.ReportInsuranceEventRequest(
                participant_id=person.participant_id,
                event_type=registry_pb2.InsuranceEventType.Value(f"INSURANCE_EVENT_TYPE_{kind}"),
            )
            if kind == "TERMINATED":
                request.termination_reason = termination_reason
            if kind == "TRANSFERRED" or (kind == "REINSTATED" and with_region):
                request.new_pooling_region = region

            def call() -> Any:
                return registry.ReportInsuranceEvent(request, metadata=ADMIN)

            dissolved: list[Rel] = []
            reason = common_pb2.DISSOLUTION_REASON_UNSPECIFIED
            returned = 0
            prefix = "HOLDER" if as_holder else "BENEFICIARY"
            if kind == "TERMINATED":
                if person.active:
                    person.active = False
                    reason = common_pb2.DissolutionReason.Value(
                        f"DISSOLUTION_REASON_{prefix}_TERMINATED"
                    )
                    dissolved = self.open_rels(person.participant_id)
            elif kind == "TRANSFERRED":
                if person.region != region:
                    if not person.active:
                        refused(call, FAILED, "PARTICIPANT_NOT_ACTIVE")
                        return
                    person.region = region
                    reason = common_pb2.DissolutionReason.Value(
                        f"DISSOLUTION_REASON_{prefix}_TRANSFERRED"
                    )
                    dissolved = self.open_rels(person.participant_id)
            else:
                if with_region and person.active and region != person.region:
                    refused(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
                    return
                person.active = True
                if with_region:
                    person.region = region
            for rel in dissolved:
                returned += self.dissolve_in_model(rel, reason)
            if returned:
                event(f"{kind} returned quota")
            answer = call()
            self.check_participant(answer.participant, person)
            assert sorted(answer.dissolved_relationship_ids) == sorted(
                r.relationship_id for r in dissolved
            )
            assert answer.returned_fen == returned

        # ------------------------------------------------------------ after every step

        @invariant()
        def money_is_conserved(self) -> None:
            shown = registry.GetParticipant(
                registry_pb2.GetParticipantRequest(participant_id=self.holder.participant_id),
                metadata=ADMIN,
            ).participant
            listed = relationships.ListRelationships(
                relationship_pb2.ListRelationshipsRequest(
                    holder_id=self.holder.participant_id, page_size=100
                ),
                metadata=APP,
            )
            assert not listed.next_page_token
            quotas = sum(r.available_fen + r.held_fen + r.spent_fen for r in listed.relationships)
            assert shown.balance_fen + quotas == self.credited
            self.check_participant(shown, self.holder)
            by_id = {r.relationship_id: r for r in listed.relationships}
            assert set(by_id) == {r.relationship_id for r in self.rels}
            for rel in self.rels:
                self.check_relationship(by_id[rel.relationship_id], rel)

        def teardown(self) -> None:
            """At the end of each run, the relatives' side agrees with the model too (checked
            once, not after every step, to keep the run short)."""
            if hasattr(self, "holder"):
                self.relatives_agree()

        def relatives_agree(self) -> None:
            for relative in self.relatives:
                shown = registry.GetParticipant(
                    registry_pb2.GetParticipantRequest(participant_id=relative.participant_id),
                    metadata=ADMIN,
                ).participant
                self.check_participant(shown, relative)
                listed = relationships.ListRelationships(
                    relationship_pb2.ListRelationshipsRequest(
                        beneficiary_id=relative.participant_id
                    ),
                    metadata=APP,
                )
                assert sorted(r.relationship_id for r in listed.relationships) == sorted(
                    r.relationship_id for r in self.rels if r.beneficiary == relative.participant_id
                )
                if relative.scheme == common_pb2.SCHEME_EMPLOYEE:
                    # Received quota never lands in the relative's own account (rule 6).
                    assert shown.balance_fen == 0

    return Conservation


def test_holder_money_is_conserved(registry, relationships) -> None:
    run_state_machine_as_test(
        machine(registry, relationships),
        settings=settings(
            max_examples=25,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
