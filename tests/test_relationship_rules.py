"""POLICY.md "Relationship rules" 1-6 against the running service: for each rule a case the
service allows and one it refuses (FAILED_PRECONDITION with the ErrorInfo reason), plus
many-to-many, consent, and the holder's money conserved to the fen through every move."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from sqlalchemy import select, update

from authz_server.domain.relationships import DEFAULT_ALLOWED_RELATIONS
from authz_server.domain.types import LedgerKind, ParticipantStatus, Relation
from authz_server.generated.medwallet.v1 import (
    common_pb2,
    registry_pb2,
    relationship_pb2,
    relationship_pb2_grpc,
)
from authz_server.server.relationship_handler import RelationshipHandler
from authz_server.service.relationships import RelationshipService
from authz_server.storage.sql.tables import LedgerEntryRow, ParticipantRow, RelationshipEventRow
from tests import factories
from tests.harness import ADMIN, APP, WINDOW, Harness, bearer, new_id

PLATFORM = bearer("test-platform")
ACTIVE = common_pb2.RELATIONSHIP_STATUS_ACTIVE
PENDING = common_pb2.RELATIONSHIP_STATUS_PENDING_CONSENT
DISSOLVED = common_pb2.RELATIONSHIP_STATUS_DISSOLVED
HOLDER = common_pb2.PARTY_HOLDER
BENEFICIARY = common_pb2.PARTY_BENEFICIARY


# --- helpers -------------------------------------------------------------------------------


def refused(call: Callable[[], Any], reason: str, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    assert factories.error_info(caught.value).reason == reason


def policy_refused(call: Callable[[], Any], reason: str) -> None:
    refused(call, reason, grpc.StatusCode.FAILED_PRECONDITION)


def propose(
    stub: relationship_pb2_grpc.RelationshipServiceStub,
    holder_id: str,
    beneficiary_id: str,
    relation: int = common_pb2.RELATION_PARENT,
    metadata: tuple[tuple[str, str], ...] = APP,
) -> relationship_pb2.Relationship:
    return stub.ProposeRelationship(
        relationship_pb2.ProposeRelationshipRequest(
            holder_id=holder_id, beneficiary_id=beneficiary_id, relation=relation
        ),
        metadata=metadata,
    ).relationship


def consent(
    stub: relationship_pb2_grpc.RelationshipServiceStub,
    relationship_id: str,
    party: int,
    metadata: tuple[tuple[str, str], ...] = APP,
) -> relationship_pb2.Relationship:
    return stub.ConsentRelationship(
        relationship_pb2.ConsentRelationshipRequest(relationship_id=relationship_id, party=party),
        metadata=metadata,
    ).relationship


def allocate(
    stub: relationship_pb2_grpc.RelationshipServiceStub, relationship_id: str, amount_fen: int
) -> relationship_pb2.AllocateQuotaResponse:
    return stub.AllocateQuota(
        relationship_pb2.AllocateQuotaRequest(
            relationship_id=relationship_id, amount_fen=amount_fen, idempotency_key=new_id("a")
        ),
        metadata=APP,
    )


def release(
    stub: relationship_pb2_grpc.RelationshipServiceStub, relationship_id: str, amount_fen: int
) -> relationship_pb2.ReleaseQuotaResponse:
    return stub.ReleaseQuota(
        relationship_pb2.ReleaseQuotaRequest(
            relationship_id=relationship_id, amount_fen=amount_fen, idempotency_key=new_id("r")
        ),
        metadata=APP,
    )


def dissolve(
    stub: relationship_pb2_grpc.RelationshipServiceStub, relationship_id: str, party: int = HOLDER
) -> relationship_pb2.DissolveRelationshipResponse:
    return stub.DissolveRelationship(
        relationship_pb2.DissolveRelationshipRequest(relationship_id=relationship_id, party=party),
        metadata=APP,
    )


def terminate(registry: Any, participant_id: str) -> None:
    registry.ReportInsuranceEvent(
        registry_pb2.ReportInsuranceEventRequest(
            participant_id=participant_id,
            event_type=registry_pb2.INSURANCE_EVENT_TYPE_TERMINATED,
            termination_reason=registry_pb2.TERMINATION_REASON_WITHDRAWAL,
        ),
        metadata=ADMIN,
    )


def list_all(
    stub: relationship_pb2_grpc.RelationshipServiceStub, page_size: int = 0, **party: str
) -> list[relationship_pb2.Relationship]:
    """Every page of ListRelationships, asserting each page respects page_size."""
    found: list[relationship_pb2.Relationship] = []
    token = ""
    while True:
        page = stub.ListRelationships(
            relationship_pb2.ListRelationshipsRequest(
                page_size=page_size, page_token=token, **party
            ),
            metadata=APP,
        )
        if page_size:
            assert len(page.relationships) <= page_size
        found.extend(page.relationships)
        token = page.next_page_token
        if not token:
            return found


def holder_money(registry: Any, stub: Any, holder_id: str) -> int:
    """The holder's balance plus every quota still allocated from it (available + held + spent)."""
    allocated = sum(r.allocated_fen for r in list_all(stub, holder_id=holder_id))
    return factories.balance(registry, holder_id) + allocated


def ledger_balance(harness: Harness, holder_id: str) -> int:
    """The personal-account balance the ledger rows of a holder explain."""
    sign = {
        LedgerKind.ACCOUNT_CREDIT.value: 1,
        LedgerKind.QUOTA_ALLOCATION.value: -1,
        LedgerKind.QUOTA_RELEASE.value: 1,
        LedgerKind.DISSOLUTION_RETURN.value: 1,
        LedgerKind.REFUND_TO_ACCOUNT.value: 1,
    }
    rows = harness.app.database.transaction(
        lambda session: session.execute(
            select(LedgerEntryRow.kind, LedgerEntryRow.amount_fen).where(
                LedgerEntryRow.holder_id == holder_id
            )
        ).all()
    )
    return sum(sign.get(kind, 0) * amount for kind, amount in rows)


def relationship_events(harness: Harness, relationship_id: str) -> list[tuple[Any, ...]]:
    """The audit trail of one relationship: (event, party, channel) in order."""
    rows = harness.app.database.transaction(
        lambda session: session.execute(
            select(
                RelationshipEventRow.event, RelationshipEventRow.party, RelationshipEventRow.channel
            )
            .where(RelationshipEventRow.relationship_id == relationship_id)
            .order_by(RelationshipEventRow.event_id)
        ).all()
    )
    return [tuple(row) for row in rows]


def assert_conserved(harness: Harness, registry: Any, stub: Any, holder_id: str, total: int):
    assert holder_money(registry, stub, holder_id) == total
    assert ledger_balance(harness, holder_id) == factories.balance(registry, holder_id)


# --- rule 1: who may be holder and beneficiary; nobody shares with themselves --------------


def test_holder_must_be_in_the_employee_scheme(registry, relationships) -> None:
    holder, resident, other_resident = (
        factories.employee(registry),
        factories.resident(registry),
        factories.resident(registry),
    )
    assert propose(relationships, holder, resident).status == PENDING
    policy_refused(lambda: propose(relationships, resident, other_resident), "HOLDER_NOT_EMPLOYEE")
    policy_refused(lambda: propose(relationships, resident, holder), "HOLDER_NOT_EMPLOYEE")


def test_beneficiary_may_be_of_either_scheme(registry, relationships) -> None:
    holder = factories.employee(registry)
    for beneficiary in (factories.employee(registry), factories.resident(registry)):
        assert propose(relationships, holder, beneficiary).status == PENDING


@pytest.mark.parametrize("side", ["holder", "beneficiary"])
def test_terminated_participant_cannot_be_proposed(registry, relationships, side) -> None:
    holder, beneficiary = factories.employee(registry), factories.resident(registry)
    terminate(registry, holder if side == "holder" else beneficiary)
    policy_refused(lambda: propose(relationships, holder, beneficiary), "PARTICIPANT_NOT_ACTIVE")
    assert list_all(relationships, holder_id=holder) == []
    assert propose(relationships, factories.employee(registry), factories.resident(registry))


@pytest.mark.parametrize("side", ["holder", "beneficiary"])
@pytest.mark.parametrize("party", [HOLDER, BENEFICIARY])
def test_participant_must_still_be_active_at_consent(
    harness, registry, relationships, side, party
) -> None:
    """An insurance event dissolves pending relationships too (see test_insurance_events), so a
    pending relationship with an inactive party is only reachable by a status written behind
    the service's back; consent must still refuse it and change nothing."""
    holder, beneficiary = factories.employee(registry), factories.resident(registry)
    allowed = propose(relationships, holder, beneficiary)
    assert consent(relationships, allowed.relationship_id, party).status == PENDING

    holder, beneficiary = factories.employee(registry), factories.resident(registry)
    pending = propose(relationships, holder, beneficiary)
    inactive = holder if side == "holder" else beneficiary
    harness.app.database.transaction(
        lambda session: session.execute(
            update(ParticipantRow)
            .where(ParticipantRow.participant_id == inactive)
            .values(status=ParticipantStatus.TERMINATED.value)
        )
    )
    policy_refused(
        lambda: consent(relationships, pending.relationship_id, party), "PARTICIPANT_NOT_ACTIVE"
    )
    shown = factories.relationship(relationships, pending.relationship_id)
    assert (shown.status, shown.holder_consented, shown.beneficiary_consented) == (
        PENDING,
        False,
        False,
    )


def test_consent_after_an_insurance_event_is_refused(registry, relationships) -> None:
    holder, beneficiary = factories.employee(registry), factories.resident(registry)
    pending = propose(relationships, holder, beneficiary)
    consent(relationships, pending.relationship_id, HOLDER)
    terminate(registry, beneficiary)
    policy_refused(
        lambda: consent(relationships, pending.relationship_id, BENEFICIARY),
        "RELATIONSHIP_NOT_PENDING",
    )
    assert factories.relationship(relationships, pending.relationship_id).status == DISSOLVED


def test_nobody_shares_with_themselves(registry, relationships) -> None:
    holder, other = factories.employee(registry), factories.employee(registry)
    assert propose(relationships, holder, other).status == PENDING
    policy_refused(lambda: propose(relationships, holder, holder), "SELF_SHARING")


# --- rule 2: close relatives; the allowed kinds are configuration --------------------------


@pytest.mark.parametrize("relation", sorted(DEFAULT_ALLOWED_RELATIONS))
def test_default_configuration_allows_each_close_relative(registry, relationships, relation):
    number = common_pb2.Relation.Value(f"RELATION_{relation.value}")
    shown = propose(
        relationships, factories.employee(registry), factories.resident(registry), number
    )
    assert (shown.status, shown.relation) == (PENDING, number)


NARROW_RELATIONS = frozenset(
    {Relation.SPOUSE, Relation.PARENT, Relation.CHILD, Relation.SIBLING}
)  # e.g. a province following 004 strictly: no grandparents or grandchildren


@pytest.fixture(scope="module")
def narrow_relationships(
    harness: Harness,
) -> Iterator[relationship_pb2_grpc.RelationshipServiceStub]:
    """A second gRPC server on the same database and Redis, configured with fewer relations."""
    service = RelationshipService(
        harness.app.database, harness.app.quotas, NARROW_RELATIONS, harness.clock
    )

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        relationship_pb2_grpc.add_RelationshipServiceServicer_to_server(
            RelationshipHandler(service, harness.app.auth), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = harness.run(start())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield relationship_pb2_grpc.RelationshipServiceStub(channel)
    harness.run(server.stop(0))


@pytest.mark.parametrize(
    ("relation", "allowed"),
    [
        (common_pb2.RELATION_SPOUSE, True),
        (common_pb2.RELATION_SIBLING, True),
        (common_pb2.RELATION_GRANDPARENT, False),
        (common_pb2.RELATION_GRANDCHILD, False),
        (common_pb2.RELATION_OTHER, False),
    ],
)
def test_configured_relations_are_enforced(
    registry, narrow_relationships, relation, allowed
) -> None:
    holder, beneficiary = factories.employee(registry), factories.resident(registry)
    if allowed:
        assert propose(narrow_relationships, holder, beneficiary, relation).status == PENDING
    else:
        policy_refused(
            lambda: propose(narrow_relationships, holder, beneficiary, relation),
            "RELATION_NOT_ALLOWED",
        )
        assert list_all(narrow_relationships, holder_id=holder) == []


# --- rule 3: many-to-many, at most one open relationship per pair --------------------------


def test_second_proposal_for_a_pair_is_refused_while_pending_or_active(
    registry, relationships
) -> None:
    holder, beneficiary = factories.employee(registry), factories.employee(registry)
    first = propose(relationships, holder, beneficiary)
    policy_refused(lambda: propose(relationships, holder, beneficiary), "DUPLICATE_RELATIONSHIP")
    policy_refused(
        lambda: propose(relationships, holder, beneficiary, common_pb2.RELATION_SPOUSE),
        "DUPLICATE_RELATIONSHIP",
    )
    consent(relationships, first.relationship_id, HOLDER)
    consent(relationships, first.relationship_id, BENEFICIARY)
    policy_refused(lambda: propose(relationships, holder, beneficiary), "DUPLICATE_RELATIONSHIP")
    # The other direction is another pair: both are employees, each may support the other.
    assert propose(relationships, beneficiary, holder).status == PENDING
    assert len(list_all(relationships, holder_id=holder)) == 1


@pytest.mark.parametrize("consented", [False, True])
def test_new_relationship_allowed_after_dissolution(registry, relationships, consented) -> None:
    holder, beneficiary = factories.employee(registry, 10_000), factories.resident(registry)
    if consented:
        first_id = factories.active_relationship(relationships, holder, beneficiary, 4_000)
    else:
        first_id = propose(relationships, holder, beneficiary).relationship_id
    dissolve(relationships, first_id, BENEFICIARY)
    second = propose(relationships, holder, beneficiary)
    assert second.relationship_id != first_id
    consent(relationships, second.relationship_id, BENEFICIARY)
    assert consent(relationships, second.relationship_id, HOLDER).status == ACTIVE
    assert allocate(relationships, second.relationship_id, 10_000).holder_balance_fen == 0
    policy_refused(lambda: propose(relationships, holder, beneficiary), "DUPLICATE_RELATIONSHIP")
    statuses = {r.relationship_id: r.status for r in list_all(relationships, holder_id=holder)}
    assert statuses == {first_id: DISSOLVED, second.relationship_id: ACTIVE}


def test_concurrent_identical_proposals_make_one_relationship(registry, relationships) -> None:
    holder, beneficiary = factories.employee(registry), factories.resident(registry)

    def attempt(_: int) -> str:
        try:
            return propose(relationships, holder, beneficiary).relationship_id
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            return factories.error_info(error).reason

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(attempt, range(10)))
    made = [o for o in outcomes if o != "DUPLICATE_RELATIONSHIP"]
    assert len(made) == 1
    assert [r.relationship_id for r in list_all(relationships, holder_id=holder)] == made


def test_many_to_many_and_paged_listing(registry, relationships) -> None:
    holder = factories.employee(registry, 60_000)
    relatives = [factories.resident(registry) for _ in range(4)]
    supported = factories.resident(registry)
    holders = [factories.employee(registry, 10_000) for _ in range(3)]

    by_holder = {
        factories.active_relationship(relationships, holder, relative, 5_000 * (i + 1))
        for i, relative in enumerate(relatives)
    }
    pending = propose(relationships, holder, supported).relationship_id
    by_holder.add(pending)
    to_supported = {
        factories.active_relationship(relationships, other, supported, 1_000) for other in holders
    }
    to_supported.add(pending)

    for page_size in (1, 2, 0):
        listed = list_all(relationships, page_size, holder_id=holder)
        assert [r.relationship_id for r in listed] == sorted(by_holder)
        assert {r.holder_id for r in listed} == {holder}
        listed = list_all(relationships, page_size, beneficiary_id=supported)
        assert {r.relationship_id for r in listed} == to_supported
        assert len(listed) == 4
        assert {r.beneficiary_id for r in listed} == {supported}

    figures = {
        r.beneficiary_id: (r.status, r.allocated_fen, r.available_fen)
        for r in list_all(relationships, 1, holder_id=holder)
    }
    assert figures == {
        **{rel: (ACTIVE, 5_000 * (i + 1), 5_000 * (i + 1)) for i, rel in enumerate(relatives)},
        supported: (PENDING, 0, 0),
    }
    assert factories.balance(registry, holder) == 60_000 - 50_000
    assert [factories.balance(registry, other) for other in holders] == [9_000] * 3
    assert list_all(relationships, 1, beneficiary_id=holder) == []


def test_page_size_one_walks_every_page_exactly_once(registry, relationships) -> None:
    holder = factories.employee(registry)
    made = [propose(relationships, holder, factories.resident(registry)) for _ in range(5)]
    pages: list[list[str]] = []
    token = ""
    while True:
        page = relationships.ListRelationships(
            relationship_pb2.ListRelationshipsRequest(
                holder_id=holder, page_size=1, page_token=token
            ),
            metadata=APP,
        )
        pages.append([r.relationship_id for r in page.relationships])
        token = page.next_page_token
        if not token:
            break
    assert pages == [[rid] for rid in sorted(r.relationship_id for r in made)]


# --- rule 4: consent from both sides, channels, either party dissolves ---------------------


@pytest.mark.parametrize("order", [(HOLDER, BENEFICIARY), (BENEFICIARY, HOLDER)])
def test_active_only_when_both_consented_in_either_order(
    harness, registry, relationships, order
) -> None:
    holder, beneficiary = factories.employee(registry, 1_000), factories.resident(registry)
    proposed = propose(relationships, holder, beneficiary, metadata=WINDOW)
    rid = proposed.relationship_id
    assert proposed.status == PENDING
    assert proposed.created_channel == common_pb2.CHANNEL_SERVICE_WINDOW
    assert not proposed.HasField("activated_at")
    policy_refused(lambda: allocate(relationships, rid, 1), "RELATIONSHIP_NOT_ACTIVE")

    first, second = order
    after_first = consent(relationships, rid, first, metadata=PLATFORM)
    assert after_first.status == PENDING
    assert (after_first.holder_consented, after_first.beneficiary_consented) == (
        first == HOLDER,
        first == BENEFICIARY,
    )
    # Repeating the first consent does not stand in for the other party's.
    assert consent(relationships, rid, first, metadata=PLATFORM).status == PENDING
    policy_refused(lambda: allocate(relationships, rid, 1), "RELATIONSHIP_NOT_ACTIVE")

    activated = consent(relationships, rid, second, metadata=APP)
    assert activated.status == ACTIVE
    assert activated.holder_consented and activated.beneficiary_consented
    assert activated.HasField("activated_at")
    assert activated.created_channel == common_pb2.CHANNEL_SERVICE_WINDOW
    assert allocate(relationships, rid, 1_000).relationship.available_fen == 1_000

    # Consenting again, from either side, is harmless: nothing changes, no money moves.
    for party in (HOLDER, BENEFICIARY):
        again = consent(relationships, rid, party, metadata=APP)
        assert again == factories.relationship(relationships, rid)
        assert (again.status, again.allocated_fen, again.available_fen) == (ACTIVE, 1_000, 1_000)
        assert again.activated_at == activated.activated_at
    assert factories.balance(registry, holder) == 0

    party_name = {HOLDER: "HOLDER", BENEFICIARY: "BENEFICIARY"}
    assert relationship_events(harness, rid) == [
        ("PROPOSED", None, "SERVICE_WINDOW"),
        ("CONSENTED", party_name[first], "PROVINCIAL_PLATFORM"),
        ("CONSENTED", party_name[second], "APP"),
        ("ACTIVATED", None, "APP"),
    ]


def test_repeated_consents_racing_releases_keep_the_quota_exact(registry, relationships) -> None:
    """A repeated consent is harmless even while the holder takes quota back: it must not set
    the hot quota from a ledger read that a release in flight is about to change."""
    holder = factories.employee(registry, 10_000)
    rid = factories.active_relationship(relationships, holder, factories.resident(registry), 10_000)

    def step(index: int) -> None:
        if index % 2:
            release(relationships, rid, 10)
        else:
            consent(relationships, rid, HOLDER if index % 4 else BENEFICIARY)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(step, range(300)))
    shown = factories.relationship(relationships, rid)
    assert (shown.allocated_fen, shown.available_fen, shown.held_fen) == (8_500, 8_500, 0)
    assert factories.balance(registry, holder) == 1_500
    # Every fen the quota shows can really be taken back, and not one more.
    policy_refused(lambda: release(relationships, rid, 8_501), "INSUFFICIENT_QUOTA")
    assert release(relationships, rid, 8_500).holder_balance_fen == 10_000


@pytest.mark.parametrize("party", [HOLDER, BENEFICIARY])
def test_either_party_may_dissolve(harness, registry, relationships, party) -> None:
    holder, beneficiary = factories.employee(registry, 9_000), factories.resident(registry)
    rid = factories.active_relationship(relationships, holder, beneficiary, 7_000)
    dissolved = dissolve(relationships, rid, party)
    assert dissolved.returned_fen == 7_000
    shown = dissolved.relationship
    assert (shown.status, shown.dissolution_reason) == (
        DISSOLVED,
        common_pb2.DISSOLUTION_REASON_VOLUNTARY,
    )
    assert (shown.allocated_fen, shown.available_fen, shown.held_fen) == (0, 0, 0)
    assert shown.HasField("dissolved_at")
    assert factories.balance(registry, holder) == 9_000
    # Dissolving again is a harmless retry; no money moves twice.
    assert dissolve(relationships, rid, party).returned_fen == 0
    assert factories.balance(registry, holder) == 9_000
    assert ledger_balance(harness, holder) == 9_000
    party_name = "HOLDER" if party == HOLDER else "BENEFICIARY"
    assert relationship_events(harness, rid)[-1] == ("DISSOLVED", party_name, "APP")


# --- rule 5: allocation from the holder's balance, release of unused quota -----------------


def test_allocation_is_limited_by_the_holder_balance(harness, registry, relationships) -> None:
    holder, beneficiary = factories.employee(registry, 50_000), factories.resident(registry)
    rid = factories.active_relationship(relationships, holder, beneficiary)
    policy_refused(lambda: allocate(relationships, rid, 50_001), "INSUFFICIENT_BALANCE")
    assert factories.balance(registry, holder) == 50_000
    assert factories.relationship(relationships, rid).allocated_fen == 0

    moved = allocate(relationships, rid, 50_000)
    assert moved.holder_balance_fen == 0
    assert (moved.relationship.allocated_fen, moved.relationship.available_fen) == (50_000, 50_000)
    policy_refused(lambda: allocate(relationships, rid, 1), "INSUFFICIENT_BALANCE")
    assert_conserved(harness, registry, relationships, holder, 50_000)


def test_quota_moves_only_on_an_active_relationship(registry, relationships) -> None:
    holder, beneficiary = factories.employee(registry, 10_000), factories.resident(registry)
    pending = propose(relationships, holder, beneficiary).relationship_id
    policy_refused(lambda: allocate(relationships, pending, 100), "RELATIONSHIP_NOT_ACTIVE")
    policy_refused(lambda: release(relationships, pending, 100), "RELATIONSHIP_NOT_ACTIVE")
    consent(relationships, pending, HOLDER)
    policy_refused(lambda: allocate(relationships, pending, 100), "RELATIONSHIP_NOT_ACTIVE")
    consent(relationships, pending, BENEFICIARY)
    assert allocate(relationships, pending, 100).relationship.available_fen == 100
    assert release(relationships, pending, 40).relationship.available_fen == 60

    dissolve(relationships, pending)
    policy_refused(lambda: allocate(relationships, pending, 100), "RELATIONSHIP_NOT_ACTIVE")
    policy_refused(lambda: release(relationships, pending, 1), "RELATIONSHIP_NOT_ACTIVE")
    assert factories.balance(registry, holder) == 10_000


def test_release_is_limited_to_the_available_quota(harness, registry, relationships) -> None:
    holder, beneficiary = factories.employee(registry, 30_000), factories.resident(registry)
    rid = factories.active_relationship(relationships, holder, beneficiary, 12_345)
    policy_refused(lambda: release(relationships, rid, 12_346), "INSUFFICIENT_QUOTA")
    shown = factories.relationship(relationships, rid)
    assert (shown.allocated_fen, shown.available_fen) == (12_345, 12_345)
    assert factories.balance(registry, holder) == 30_000 - 12_345

    released = release(relationships, rid, 12_345)
    assert released.holder_balance_fen == 30_000
    assert (released.relationship.allocated_fen, released.relationship.available_fen) == (0, 0)
    policy_refused(lambda: release(relationships, rid, 1), "INSUFFICIENT_QUOTA")
    assert_conserved(harness, registry, relationships, holder, 30_000)


def test_holder_money_is_conserved_to_the_fen(harness, registry, relationships) -> None:
    total = 1_000_001
    holder = factories.employee(registry, total)
    first = factories.active_relationship(relationships, holder, factories.resident(registry))
    employee_beneficiary = factories.employee(registry, 777)
    second = factories.active_relationship(relationships, holder, employee_beneficiary)
    steps: list[Callable[[], Any]] = [
        lambda: allocate(relationships, first, 333_333),
        lambda: allocate(relationships, second, 1),
        lambda: release(relationships, first, 1),
        lambda: allocate(relationships, second, 666_666),
        lambda: release(relationships, second, 99_999),
        lambda: allocate(relationships, first, 1),
        lambda: dissolve(relationships, second, BENEFICIARY),
        lambda: release(relationships, first, 333_333),
        lambda: dissolve(relationships, first, HOLDER),
    ]
    assert_conserved(harness, registry, relationships, holder, total)
    for step in steps:
        step()
        assert_conserved(harness, registry, relationships, holder, total)
    assert factories.balance(registry, holder) == total
    assert holder_money(registry, relationships, holder) == total
    # The beneficiary's own personal account was never touched by the sharing.
    assert factories.balance(registry, employee_beneficiary) == 777


def test_concurrent_allocations_from_one_account_never_overdraw(
    harness, registry, relationships
) -> None:
    """Allocations to several relationships of one holder race for the same balance (and a
    credit arrives meanwhile): the balance never goes negative and every fen is accounted."""
    holder = factories.employee(registry, 10_000)
    rids = [
        factories.active_relationship(relationships, holder, factories.resident(registry))
        for _ in range(4)
    ]

    def attempt(index: int) -> int:
        if index == 0:
            registry.CreditPersonalAccount(
                registry_pb2.CreditPersonalAccountRequest(
                    participant_id=holder, amount_fen=5_000, idempotency_key=new_id("c")
                ),
                metadata=ADMIN,
            )
            return 0
        try:
            return allocate(relationships, rids[index % len(rids)], 700).relationship.allocated_fen
        except grpc.RpcError as error:
            assert factories.error_info(error).reason == "INSUFFICIENT_BALANCE"
            return -1

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(attempt, range(40)))
    allocated = sum(factories.relationship(relationships, rid).allocated_fen for rid in rids)
    succeeded = sum(1 for o in outcomes[1:] if o > 0)
    assert allocated == 700 * succeeded
    assert factories.balance(registry, holder) == 15_000 - allocated >= 0
    assert_conserved(harness, registry, relationships, holder, 15_000)


# --- rule 6: received quota is never re-shared ---------------------------------------------


def test_received_quota_cannot_be_reshared(harness, registry, relationships) -> None:
    """An employee beneficiary can share only from their own personal account: quota received
    from another holder neither enters their balance nor counts toward what they may allocate."""
    parent = factories.employee(registry, 80_000)
    child = factories.employee(registry, 2_000)
    grandchild = factories.resident(registry)
    received = factories.active_relationship(
        relationships, parent, child, 50_000, common_pb2.RELATION_CHILD
    )
    assert factories.balance(registry, child) == 2_000

    onward = factories.active_relationship(relationships, child, grandchild)
    policy_refused(lambda: allocate(relationships, onward, 2_001), "INSUFFICIENT_BALANCE")
    policy_refused(lambda: allocate(relationships, onward, 50_000), "INSUFFICIENT_BALANCE")
    assert allocate(relationships, onward, 2_000).holder_balance_fen == 0

    shown = factories.relationship(relationships, received)
    assert (shown.allocated_fen, shown.available_fen) == (50_000, 50_000)
    assert factories.balance(registry, parent) == 30_000
    assert_conserved(harness, registry, relationships, parent, 80_000)
    assert_conserved(harness, registry, relationships, child, 2_000)
    # Dissolving the received quota returns it to the parent, never to the child.
    assert dissolve(relationships, received, BENEFICIARY).returned_fen == 50_000
    assert (factories.balance(registry, parent), factories.balance(registry, child)) == (80_000, 0)
    assert factories.relationship(relationships, onward).available_fen == 2_000


def test_unknown_relationship_is_not_found(relationships) -> None:
    refused(
        lambda: allocate(relationships, new_id("missing"), 1),
        "NOT_FOUND",
        grpc.StatusCode.NOT_FOUND,
    )
