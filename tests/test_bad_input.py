"""Bad input to every RPC of RegistryService and RelationshipService: each is refused with
INVALID_ARGUMENT whose ErrorInfo names the field, or NOT_FOUND for an unknown id, and nothing is
written (balances, participants, relationships, idempotency keys, merchants, catalog items)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

from authz_server.generated.medwallet.v1 import (
    common_pb2,
    registry_pb2,
    relationship_pb2,
)
from authz_server.storage.sql.tables import CatalogItemRow, MerchantRow
from tests import factories
from tests.harness import ADMIN, APP, new_id

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
MAX_AMOUNT = 10_000_000_000

LONG_ID = "x" * 65
BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param(LONG_ID, id="65-chars"),
    pytest.param("x" * 10_000, id="10000-chars"),
    pytest.param("a b", id="space"),
    pytest.param("a/b", id="slash"),
    pytest.param("a.b", id="dot"),
    pytest.param("x'; DROP TABLE participants;--", id="sql"),
    pytest.param("张三", id="cjk"),
    pytest.param("abc\n", id="newline"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("ab%", id="percent"),
]
BAD_AMOUNTS = [
    pytest.param(0, id="zero"),
    pytest.param(-1, id="minus-one"),
    pytest.param(-100_000, id="negative"),
    pytest.param(INT64_MIN, id="int64-min"),
    pytest.param(MAX_AMOUNT + 1, id="over-10e9"),
    pytest.param(10**15, id="10e15"),
    pytest.param(INT64_MAX, id="int64-max"),
]
BAD_KEYS = [
    pytest.param("", id="empty"),
    pytest.param("k" * 65, id="65-chars"),
    pytest.param(" lead", id="leading-space"),
    pytest.param("trail ", id="trailing-space"),
    pytest.param("tab\tkey", id="tab"),
    pytest.param("line\nkey", id="newline"),
    pytest.param("nul\x00key", id="nul"),
]
BAD_REGIONS = [
    pytest.param("", id="empty"),
    pytest.param("11010", id="5-digits"),
    pytest.param("1101000", id="7-digits"),
    pytest.param("abcdef", id="letters"),
    pytest.param("000000", id="zeros"),
    pytest.param("990000", id="province-99"),
    pytest.param("100000", id="province-10"),
    pytest.param("190000", id="province-19"),
    pytest.param("720000", id="province-72"),
    pytest.param("890000", id="province-89"),
    pytest.param("110100 ", id="trailing-space"),
    pytest.param(" 110100", id="leading-space"),
    pytest.param("11-100", id="dash"),
    pytest.param("１１０１００", id="fullwidth-digits"),
    pytest.param("110100\n", id="newline"),
]
BAD_ENUMS = [pytest.param(0, id="unset"), pytest.param(99, id="unknown")]
BAD_NAMES = [
    pytest.param("n" * 201, id="201-chars"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("line\nbreak", id="newline"),
]


@dataclass(frozen=True)
class World:
    """A holder with money, an active relationship with quota and a pending one."""

    holder: str
    relative: str
    other: str
    active: str
    pending: str


@pytest.fixture(scope="module")
def world(registry, relationships) -> World:
    holder = factories.employee(registry, balance_fen=100_000)
    relative = factories.resident(registry)
    other = factories.resident(registry)
    active = factories.active_relationship(relationships, holder, relative, 30_000)
    pending = relationships.ProposeRelationship(
        relationship_pb2.ProposeRelationshipRequest(
            holder_id=holder, beneficiary_id=other, relation=common_pb2.RELATION_CHILD
        ),
        metadata=APP,
    ).relationship.relationship_id
    return World(holder, relative, other, active, pending)


@pytest.fixture(scope="module")
def engine(harness) -> Iterator[Engine]:
    opened = create_engine(harness.database_url)
    yield opened
    opened.dispose()


def snapshot(registry, relationships, world: World) -> dict[str, Any]:
    """Everything a refused call could have changed."""

    def participant(participant_id: str) -> bytes:
        return registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id=participant_id), metadata=ADMIN
        ).participant.SerializeToString(deterministic=True)

    def listed(**party: str) -> list[bytes]:
        response = relationships.ListRelationships(
            relationship_pb2.ListRelationshipsRequest(**party), metadata=APP
        )
        return [r.SerializeToString(deterministic=True) for r in response.relationships]

    return {
        "holder": participant(world.holder),
        "relative": participant(world.relative),
        "other": participant(world.other),
        "by_holder": listed(holder_id=world.holder),
        "by_relative": listed(beneficiary_id=world.relative),
        "by_other": listed(beneficiary_id=world.other),
    }


def refused(call: Callable[[], Any], code: grpc.StatusCode, reason: str) -> Any:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    info = factories.error_info(caught.value)
    assert info.reason == reason
    return info


def assert_invalid(
    registry, relationships, world: World, call: Callable[[], Any], field: str
) -> None:
    before = snapshot(registry, relationships, world)
    info = refused(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert info.metadata["field"] == field
    assert info.metadata["why"]
    assert snapshot(registry, relationships, world) == before
    assert factories.balance(registry, world.holder) == 70_000
    shown = factories.relationship(relationships, world.active)
    assert (shown.status, shown.allocated_fen, shown.available_fen) == (
        common_pb2.RELATIONSHIP_STATUS_ACTIVE,
        30_000,
        30_000,
    )


# ---------------------------------------------------------------- RegistryService


def _upsert(registry, participant_id: str, scheme: int, region: str) -> Callable[[], Any]:
    return lambda: registry.UpsertParticipant(
        registry_pb2.UpsertParticipantRequest(
            participant_id=participant_id, scheme=scheme, pooling_region=region
        ),
        metadata=ADMIN,
    )


def _not_a_participant(registry, participant_id: str) -> None:
    refused(
        lambda: registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id=participant_id), metadata=ADMIN
        ),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )


@pytest.mark.parametrize("bad", BAD_IDS)
def test_upsert_participant_bad_id(registry, relationships, world, bad) -> None:
    call = _upsert(registry, bad, common_pb2.SCHEME_EMPLOYEE, "110100")
    assert_invalid(registry, relationships, world, call, "participant_id")


@pytest.mark.parametrize("bad", BAD_ENUMS)
def test_upsert_participant_bad_scheme(registry, relationships, world, bad) -> None:
    fresh = new_id("p")
    call = _upsert(registry, fresh, bad, "110100")
    assert_invalid(registry, relationships, world, call, "scheme")
    _not_a_participant(registry, fresh)


@pytest.mark.parametrize("bad", BAD_REGIONS)
def test_upsert_participant_bad_region(registry, relationships, world, bad) -> None:
    fresh = new_id("p")
    call = _upsert(registry, fresh, common_pb2.SCHEME_RESIDENT, bad)
    assert_invalid(registry, relationships, world, call, "pooling_region")
    _not_a_participant(registry, fresh)


@pytest.mark.parametrize("region", ["110100", "150200", "230100", "460100", "540100", "810000"])
def test_upsert_participant_good_region(registry, region) -> None:
    fresh = new_id("p")
    created = _upsert(registry, fresh, common_pb2.SCHEME_RESIDENT, region)()
    assert created.created and created.participant.pooling_region == region


def test_upsert_participant_bad_region_keeps_existing(registry, relationships, world) -> None:
    call = _upsert(registry, world.holder, common_pb2.SCHEME_EMPLOYEE, "abcdef")
    assert_invalid(registry, relationships, world, call, "pooling_region")


@pytest.mark.parametrize("bad", BAD_IDS)
def test_get_participant_bad_id(registry, relationships, world, bad) -> None:
    def call() -> Any:
        return registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id=bad), metadata=ADMIN
        )

    assert_invalid(registry, relationships, world, call, "participant_id")


def _credit(registry, participant_id: str, amount: int, key: str) -> Callable[[], Any]:
    return lambda: registry.CreditPersonalAccount(
        registry_pb2.CreditPersonalAccountRequest(
            participant_id=participant_id, amount_fen=amount, idempotency_key=key
        ),
        metadata=ADMIN,
    )


@pytest.mark.parametrize("bad", BAD_IDS)
def test_credit_bad_participant_id(registry, relationships, world, bad) -> None:
    call = _credit(registry, bad, 100, new_id("k"))
    assert_invalid(registry, relationships, world, call, "participant_id")


@pytest.mark.parametrize("bad", BAD_AMOUNTS)
def test_credit_bad_amount(registry, relationships, world, bad) -> None:
    key = new_id("k")
    call = _credit(registry, world.holder, bad, key)
    assert_invalid(registry, relationships, world, call, "amount_fen")
    # The key was not spent: a good request with it is served, not ALREADY_EXISTS.
    target = factories.employee(registry)
    assert _credit(registry, target, 5, key)().balance_fen == 5


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_credit_bad_idempotency_key(registry, relationships, world, bad) -> None:
    call = _credit(registry, world.holder, 100, bad)
    assert_invalid(registry, relationships, world, call, "idempotency_key")


def test_credit_largest_amount_is_accepted(registry) -> None:
    target = factories.employee(registry)
    assert _credit(registry, target, MAX_AMOUNT, new_id("k"))().balance_fen == MAX_AMOUNT


def _event(registry, **fields: Any) -> Callable[[], Any]:
    return lambda: registry.ReportInsuranceEvent(
        registry_pb2.ReportInsuranceEventRequest(**fields), metadata=ADMIN
    )


TERMINATED = registry_pb2.INSURANCE_EVENT_TYPE_TERMINATED
TRANSFERRED = registry_pb2.INSURANCE_EVENT_TYPE_TRANSFERRED
REINSTATED = registry_pb2.INSURANCE_EVENT_TYPE_REINSTATED
RETIREMENT = registry_pb2.TERMINATION_REASON_RETIREMENT


@pytest.mark.parametrize("bad", BAD_IDS)
def test_event_bad_participant_id(registry, relationships, world, bad) -> None:
    call = _event(
        registry, participant_id=bad, event_type=TERMINATED, termination_reason=RETIREMENT
    )
    assert_invalid(registry, relationships, world, call, "participant_id")


@pytest.mark.parametrize("bad", BAD_ENUMS)
@pytest.mark.parametrize("who", ["holder", "relative"])
def test_event_bad_event_type(registry, relationships, world, bad, who) -> None:
    call = _event(
        registry,
        participant_id=getattr(world, who),
        event_type=bad,
        termination_reason=RETIREMENT,
        new_pooling_region="310100",
    )
    assert_invalid(registry, relationships, world, call, "event_type")


@pytest.mark.parametrize("bad", BAD_ENUMS)
@pytest.mark.parametrize("who", ["holder", "relative"])
def test_event_terminated_bad_reason(registry, relationships, world, bad, who) -> None:
    call = _event(
        registry, participant_id=getattr(world, who), event_type=TERMINATED, termination_reason=bad
    )
    assert_invalid(registry, relationships, world, call, "termination_reason")


@pytest.mark.parametrize("bad", BAD_REGIONS)
@pytest.mark.parametrize("who", ["holder", "relative"])
def test_event_transferred_bad_region(registry, relationships, world, bad, who) -> None:
    call = _event(
        registry,
        participant_id=getattr(world, who),
        event_type=TRANSFERRED,
        new_pooling_region=bad,
    )
    assert_invalid(registry, relationships, world, call, "new_pooling_region")


@pytest.mark.parametrize(
    "bad", [p for p in BAD_REGIONS if p.values[0]]
)  # empty is "no change" for REINSTATED
def test_event_reinstated_bad_region(registry, relationships, world, bad) -> None:
    call = _event(
        registry, participant_id=world.relative, event_type=REINSTATED, new_pooling_region=bad
    )
    assert_invalid(registry, relationships, world, call, "new_pooling_region")


def test_event_reinstated_unknown_scheme(registry, relationships, world) -> None:
    call = _event(registry, participant_id=world.relative, event_type=REINSTATED, new_scheme=99)
    assert_invalid(registry, relationships, world, call, "new_scheme")


def test_event_reinstated_active_with_new_scheme(registry, relationships, world) -> None:
    call = _event(
        registry,
        participant_id=world.relative,
        event_type=REINSTATED,
        new_scheme=common_pb2.SCHEME_EMPLOYEE,
    )
    assert_invalid(registry, relationships, world, call, "new_scheme")


def _merchant(registry, **fields: Any) -> Callable[[], Any]:
    values: dict[str, Any] = {
        "merchant_id": new_id("m"),
        "kind": common_pb2.MERCHANT_KIND_RETAIL_PHARMACY,
        "pooling_region": "110100",
        "designated": True,
        "name": "Pharmacy",
    }
    values.update(fields)
    return lambda: registry.UpsertMerchant(
        registry_pb2.UpsertMerchantRequest(merchant=registry_pb2.Merchant(**values)),
        metadata=ADMIN,
    )


def _merchants(engine: Engine, merchant_id: str) -> int:
    with engine.connect() as connection:
        return connection.execute(
            select(func.count())
            .select_from(MerchantRow)
            .where(MerchantRow.merchant_id == merchant_id)
        ).scalar_one()


MERCHANT_CASES = [
    *[pytest.param("merchant_id", p.values[0], id=f"id-{p.id}") for p in BAD_IDS],
    *[pytest.param("kind", p.values[0], id=f"kind-{p.id}") for p in BAD_ENUMS],
    *[pytest.param("pooling_region", p.values[0], id=f"region-{p.id}") for p in BAD_REGIONS],
    *[pytest.param("name", p.values[0], id=f"name-{p.id}") for p in BAD_NAMES],
]


@pytest.mark.parametrize(("field", "bad"), MERCHANT_CASES)
def test_upsert_merchant_bad_field(registry, relationships, world, engine, field, bad) -> None:
    fresh = new_id("m")
    fields = {"merchant_id": fresh, field: bad}
    call = _merchant(registry, **fields)
    assert_invalid(registry, relationships, world, call, f"merchant.{field}")
    assert _merchants(engine, fresh) == 0


def test_upsert_merchant_unset(registry, relationships, world) -> None:
    def call() -> Any:
        return registry.UpsertMerchant(registry_pb2.UpsertMerchantRequest(), metadata=ADMIN)

    assert_invalid(registry, relationships, world, call, "merchant.merchant_id")


def _items(engine: Engine, codes: list[str]) -> int:
    with engine.connect() as connection:
        return connection.execute(
            select(func.count())
            .select_from(CatalogItemRow)
            .where(CatalogItemRow.item_code.in_(codes))
        ).scalar_one()


CATALOG_CASES = [
    *[pytest.param("item_code", p.values[0], id=f"code-{p.id}") for p in BAD_IDS],
    *[pytest.param("category", p.values[0], id=f"category-{p.id}") for p in BAD_ENUMS],
    *[pytest.param("name", p.values[0], id=f"name-{p.id}") for p in BAD_NAMES],
]


@pytest.mark.parametrize(("field", "bad"), CATALOG_CASES)
def test_upsert_catalog_bad_second_item(registry, relationships, world, engine, field, bad) -> None:
    """The second item is bad: the first, good one is not written either."""
    good = new_id("item")
    values: dict[str, Any] = {
        "item_code": new_id("item"),
        "name": "Drug",
        "category": common_pb2.ITEM_CATEGORY_DRUG,
        "eligible": True,
    }
    values[field] = bad
    items = [
        registry_pb2.CatalogItem(
            item_code=good, name="Good", category=common_pb2.ITEM_CATEGORY_DRUG, eligible=True
        ),
        registry_pb2.CatalogItem(**values),
    ]

    def call() -> Any:
        return registry.UpsertCatalogItems(
            registry_pb2.UpsertCatalogItemsRequest(items=items), metadata=ADMIN
        )

    assert_invalid(registry, relationships, world, call, f"items[1].{field}")
    codes = [good] if field == "item_code" else [good, values["item_code"]]
    assert _items(engine, codes) == 0


def test_upsert_catalog_too_many_items(registry, relationships, world, engine) -> None:
    codes = [new_id("item") for _ in range(1001)]
    items = [
        registry_pb2.CatalogItem(item_code=c, name="x", category=common_pb2.ITEM_CATEGORY_DRUG)
        for c in codes
    ]

    def call() -> Any:
        return registry.UpsertCatalogItems(
            registry_pb2.UpsertCatalogItemsRequest(items=items), metadata=ADMIN
        )

    assert_invalid(registry, relationships, world, call, "items")
    assert _items(engine, codes) == 0


# ---------------------------------------------------------------- RelationshipService


def _propose(relationships, holder: str, beneficiary: str, relation: int) -> Callable[[], Any]:
    return lambda: relationships.ProposeRelationship(
        relationship_pb2.ProposeRelationshipRequest(
            holder_id=holder, beneficiary_id=beneficiary, relation=relation
        ),
        metadata=APP,
    )


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("field", ["holder_id", "beneficiary_id"])
def test_propose_bad_id(registry, relationships, world, field, bad) -> None:
    fresh = factories.resident(registry)
    ids = {"holder_id": world.holder, "beneficiary_id": fresh, field: bad}
    call = _propose(relationships, ids["holder_id"], ids["beneficiary_id"], 2)
    assert_invalid(registry, relationships, world, call, field)


@pytest.mark.parametrize("bad", BAD_ENUMS)
def test_propose_bad_relation(registry, relationships, world, bad) -> None:
    fresh = factories.resident(registry)
    call = _propose(relationships, world.holder, fresh, bad)
    assert_invalid(registry, relationships, world, call, "relation")
    listed = relationships.ListRelationships(
        relationship_pb2.ListRelationshipsRequest(beneficiary_id=fresh), metadata=APP
    )
    assert list(listed.relationships) == []


def _consent(relationships, relationship_id: str, party: int) -> Callable[[], Any]:
    return lambda: relationships.ConsentRelationship(
        relationship_pb2.ConsentRelationshipRequest(relationship_id=relationship_id, party=party),
        metadata=APP,
    )


@pytest.mark.parametrize("bad", BAD_IDS)
def test_consent_bad_id(registry, relationships, world, bad) -> None:
    call = _consent(relationships, bad, common_pb2.PARTY_HOLDER)
    assert_invalid(registry, relationships, world, call, "relationship_id")


@pytest.mark.parametrize("bad", BAD_ENUMS)
def test_consent_bad_party(registry, relationships, world, bad) -> None:
    call = _consent(relationships, world.pending, bad)
    assert_invalid(registry, relationships, world, call, "party")
    shown = factories.relationship(relationships, world.pending)
    assert shown.status == common_pb2.RELATIONSHIP_STATUS_PENDING_CONSENT
    assert not shown.holder_consented and not shown.beneficiary_consented


MOVES = ["AllocateQuota", "ReleaseQuota"]


def _move(relationships, method: str, relationship_id: str, amount: int, key: str) -> Any:
    request_type = getattr(relationship_pb2, f"{method}Request")
    return lambda: getattr(relationships, method)(
        request_type(relationship_id=relationship_id, amount_fen=amount, idempotency_key=key),
        metadata=APP,
    )


@pytest.mark.parametrize("method", MOVES)
@pytest.mark.parametrize("bad", BAD_IDS)
def test_move_bad_relationship_id(registry, relationships, world, method, bad) -> None:
    call = _move(relationships, method, bad, 100, new_id("k"))
    assert_invalid(registry, relationships, world, call, "relationship_id")


@pytest.mark.parametrize("method", MOVES)
@pytest.mark.parametrize("bad", BAD_AMOUNTS)
def test_move_bad_amount(registry, relationships, world, method, bad) -> None:
    key = new_id("k")
    call = _move(relationships, method, world.active, bad, key)
    assert_invalid(registry, relationships, world, call, "amount_fen")
    # The key was not spent: a good request with it is served (on another relationship).
    holder = factories.employee(registry, balance_fen=1_000)
    other = factories.active_relationship(relationships, holder, factories.resident(registry), 500)
    answer = _move(relationships, method, other, 7, key)()
    assert answer.relationship.available_fen == (507 if method == "AllocateQuota" else 493)


@pytest.mark.parametrize("method", MOVES)
@pytest.mark.parametrize("bad", BAD_KEYS)
def test_move_bad_idempotency_key(registry, relationships, world, method, bad) -> None:
    call = _move(relationships, method, world.active, 100, bad)
    assert_invalid(registry, relationships, world, call, "idempotency_key")


def _dissolve(relationships, relationship_id: str, party: int) -> Callable[[], Any]:
    return lambda: relationships.DissolveRelationship(
        relationship_pb2.DissolveRelationshipRequest(relationship_id=relationship_id, party=party),
        metadata=APP,
    )


@pytest.mark.parametrize("bad", BAD_IDS)
def test_dissolve_bad_id(registry, relationships, world, bad) -> None:
    call = _dissolve(relationships, bad, common_pb2.PARTY_HOLDER)
    assert_invalid(registry, relationships, world, call, "relationship_id")


@pytest.mark.parametrize("bad", BAD_ENUMS)
@pytest.mark.parametrize("which", ["active", "pending"])
def test_dissolve_bad_party(registry, relationships, world, bad, which) -> None:
    call = _dissolve(relationships, getattr(world, which), bad)
    assert_invalid(registry, relationships, world, call, "party")


@pytest.mark.parametrize("bad", BAD_IDS)
def test_get_relationship_bad_id(registry, relationships, world, bad) -> None:
    def call() -> Any:
        return relationships.GetRelationship(
            relationship_pb2.GetRelationshipRequest(relationship_id=bad), metadata=APP
        )

    assert_invalid(registry, relationships, world, call, "relationship_id")


def _list(relationships, **fields: Any) -> Callable[[], Any]:
    return lambda: relationships.ListRelationships(
        relationship_pb2.ListRelationshipsRequest(**fields), metadata=APP
    )


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("field", ["holder_id", "beneficiary_id"])
def test_list_bad_party_id(registry, relationships, world, field, bad) -> None:
    call = _list(relationships, **{field: bad})
    assert_invalid(registry, relationships, world, call, field)


def test_list_without_filter(registry, relationships, world) -> None:
    call = _list(relationships, page_size=10)
    assert_invalid(registry, relationships, world, call, "holder_id")


@pytest.mark.parametrize("bad", [-1, 101, INT32_MIN, INT32_MAX])
def test_list_bad_page_size(registry, relationships, world, bad) -> None:
    call = _list(relationships, holder_id=world.holder, page_size=bad)
    assert_invalid(registry, relationships, world, call, "page_size")


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param("!!!!", id="punctuation"),
        pytest.param("%%%%", id="percent"),
        pytest.param("a", id="one-char"),
        pytest.param("zzzz", id="not-utf8"),
        pytest.param("=", id="padding"),
        pytest.param("Lw==", id="slash-id"),
        pytest.param("t" * 10_000, id="10000-chars"),
        pytest.param("令牌", id="cjk"),
    ],
)
def test_list_bad_page_token(registry, relationships, world, bad) -> None:
    call = _list(relationships, holder_id=world.holder, page_size=1, page_token=bad)
    assert_invalid(registry, relationships, world, call, "page_token")


def test_list_pages_with_issued_tokens(relationships, world) -> None:
    """Control: the tokens the service issues page through the holder's relationships."""
    seen: list[str] = []
    token = ""
    while True:
        page = _list(relationships, holder_id=world.holder, page_size=1, page_token=token)()
        seen.extend(r.relationship_id for r in page.relationships)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted([world.active, world.pending])
    for size in (0, 100):
        assert len(_list(relationships, holder_id=world.holder, page_size=size)().relationships)


# ---------------------------------------------------------------- unknown ids: NOT_FOUND


def _unknown_calls(registry, relationships, world: World) -> dict[str, Callable[[], Any]]:
    unknown = new_id("nobody")
    return {
        "GetParticipant": lambda: registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id=unknown), metadata=ADMIN
        ),
        "CreditPersonalAccount": _credit(registry, unknown, 100, new_id("k")),
        "ReportInsuranceEvent-terminated": _event(
            registry, participant_id=unknown, event_type=TERMINATED, termination_reason=RETIREMENT
        ),
        "ReportInsuranceEvent-transferred": _event(
            registry, participant_id=unknown, event_type=TRANSFERRED, new_pooling_region="310100"
        ),
        "ReportInsuranceEvent-reinstated": _event(
            registry, participant_id=unknown, event_type=REINSTATED
        ),
        "ProposeRelationship-holder": _propose(relationships, unknown, world.other, 2),
        "ProposeRelationship-beneficiary": _propose(relationships, world.holder, unknown, 2),
        "ConsentRelationship": _consent(relationships, unknown, common_pb2.PARTY_HOLDER),
        "AllocateQuota": _move(relationships, "AllocateQuota", unknown, 100, new_id("k")),
        "ReleaseQuota": _move(relationships, "ReleaseQuota", unknown, 100, new_id("k")),
        "DissolveRelationship": _dissolve(relationships, unknown, common_pb2.PARTY_HOLDER),
        "GetRelationship": lambda: relationships.GetRelationship(
            relationship_pb2.GetRelationshipRequest(relationship_id=unknown), metadata=APP
        ),
    }


UNKNOWN_RPCS = [
    "GetParticipant",
    "CreditPersonalAccount",
    "ReportInsuranceEvent-terminated",
    "ReportInsuranceEvent-transferred",
    "ReportInsuranceEvent-reinstated",
    "ProposeRelationship-holder",
    "ProposeRelationship-beneficiary",
    "ConsentRelationship",
    "AllocateQuota",
    "ReleaseQuota",
    "DissolveRelationship",
    "GetRelationship",
]


@pytest.mark.parametrize("rpc", UNKNOWN_RPCS)
def test_unknown_id_is_not_found(registry, relationships, world, rpc) -> None:
    call = _unknown_calls(registry, relationships, world)[rpc]
    before = snapshot(registry, relationships, world)
    refused(call, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert snapshot(registry, relationships, world) == before


def test_unknown_participant_lists_nothing(relationships) -> None:
    for field in ("holder_id", "beneficiary_id"):
        listed = _list(relationships, **{field: new_id("nobody")})()
        assert list(listed.relationships) == []
        assert listed.next_page_token == ""
