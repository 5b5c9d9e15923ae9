"""Authentication and authorization of the caller: every call carries `authorization: Bearer
<token>`; a missing, malformed or unknown token is UNAUTHENTICATED, the wrong kind of principal
is PERMISSION_DENIED, and a refused call writes nothing. Identity comes from the token only."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

from authz_server.generated.medwallet.v1 import common_pb2, registry_pb2, relationship_pb2
from authz_server.storage.sql.tables import CatalogItemRow, MerchantRow
from tests import factories
from tests.harness import ADMIN, APP, bearer, new_id

# Who may call what is decided from the token before any SQL: the same on every database.
pytestmark = pytest.mark.backend_neutral

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class World:
    holder: str
    relative: str
    spare: str
    active: str
    pending: str
    # Ids that calls try to create; a refused call must leave them absent.
    new_participant: str
    new_merchant: str
    new_item: str


@pytest.fixture(scope="module")
def world(registry, relationships) -> World:
    holder = factories.employee(registry, balance_fen=100_000)
    relative = factories.resident(registry)
    other = factories.resident(registry)
    spare = factories.resident(registry)
    active = factories.active_relationship(relationships, holder, relative, 30_000)
    pending = relationships.ProposeRelationship(
        relationship_pb2.ProposeRelationshipRequest(
            holder_id=holder, beneficiary_id=other, relation=common_pb2.RELATION_CHILD
        ),
        metadata=APP,
    ).relationship.relationship_id
    return World(holder, relative, spare, active, pending, new_id("p"), new_id("m"), new_id("item"))


@pytest.fixture(scope="module")
def engine(harness) -> Iterator[Engine]:
    opened = create_engine(harness.database_url)
    yield opened
    opened.dispose()


def registry_calls(registry, w: World) -> dict[str, Callable[[Metadata], Any]]:
    """One well-formed request per RegistryService RPC: it would succeed (and write) if the
    caller were allowed."""
    return {
        "UpsertParticipant": lambda md: registry.UpsertParticipant(
            registry_pb2.UpsertParticipantRequest(
                participant_id=w.new_participant,
                scheme=common_pb2.SCHEME_EMPLOYEE,
                pooling_region="110100",
            ),
            metadata=md,
        ),
        "GetParticipant": lambda md: registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id=w.holder), metadata=md
        ),
        "CreditPersonalAccount": lambda md: registry.CreditPersonalAccount(
            registry_pb2.CreditPersonalAccountRequest(
                participant_id=w.holder, amount_fen=100, idempotency_key=new_id("k")
            ),
            metadata=md,
        ),
        "ReportInsuranceEvent": lambda md: registry.ReportInsuranceEvent(
            registry_pb2.ReportInsuranceEventRequest(
                participant_id=w.holder,
                event_type=registry_pb2.INSURANCE_EVENT_TYPE_TERMINATED,
                termination_reason=registry_pb2.TERMINATION_REASON_DEATH,
            ),
            metadata=md,
        ),
        "UpsertMerchant": lambda md: registry.UpsertMerchant(
            registry_pb2.UpsertMerchantRequest(
                merchant=registry_pb2.Merchant(
                    merchant_id=w.new_merchant,
                    kind=common_pb2.MERCHANT_KIND_RETAIL_PHARMACY,
                    pooling_region="110100",
                    designated=True,
                    name="Pharmacy",
                )
            ),
            metadata=md,
        ),
        "UpsertCatalogItems": lambda md: registry.UpsertCatalogItems(
            registry_pb2.UpsertCatalogItemsRequest(
                items=[
                    registry_pb2.CatalogItem(
                        item_code=w.new_item,
                        name="Drug",
                        category=common_pb2.ITEM_CATEGORY_DRUG,
                        eligible=True,
                    )
                ]
            ),
            metadata=md,
        ),
    }


def relationship_calls(relationships, w: World) -> dict[str, Callable[[Metadata], Any]]:
    """One well-formed request per RelationshipService RPC."""
    return {
        "ProposeRelationship": lambda md: relationships.ProposeRelationship(
            relationship_pb2.ProposeRelationshipRequest(
                holder_id=w.holder, beneficiary_id=w.spare, relation=common_pb2.RELATION_SPOUSE
            ),
            metadata=md,
        ),
        "ConsentRelationship": lambda md: relationships.ConsentRelationship(
            relationship_pb2.ConsentRelationshipRequest(
                relationship_id=w.pending, party=common_pb2.PARTY_HOLDER
            ),
            metadata=md,
        ),
        "AllocateQuota": lambda md: relationships.AllocateQuota(
            relationship_pb2.AllocateQuotaRequest(
                relationship_id=w.active, amount_fen=100, idempotency_key=new_id("k")
            ),
            metadata=md,
        ),
        "ReleaseQuota": lambda md: relationships.ReleaseQuota(
            relationship_pb2.ReleaseQuotaRequest(
                relationship_id=w.active, amount_fen=100, idempotency_key=new_id("k")
            ),
            metadata=md,
        ),
        "DissolveRelationship": lambda md: relationships.DissolveRelationship(
            relationship_pb2.DissolveRelationshipRequest(
                relationship_id=w.active, party=common_pb2.PARTY_BENEFICIARY
            ),
            metadata=md,
        ),
        "GetRelationship": lambda md: relationships.GetRelationship(
            relationship_pb2.GetRelationshipRequest(relationship_id=w.active), metadata=md
        ),
        "ListRelationships": lambda md: relationships.ListRelationships(
            relationship_pb2.ListRelationshipsRequest(holder_id=w.holder), metadata=md
        ),
    }


REGISTRY_RPCS = [
    "UpsertParticipant",
    "GetParticipant",
    "CreditPersonalAccount",
    "ReportInsuranceEvent",
    "UpsertMerchant",
    "UpsertCatalogItems",
]
RELATIONSHIP_RPCS = [
    "ProposeRelationship",
    "ConsentRelationship",
    "AllocateQuota",
    "ReleaseQuota",
    "DissolveRelationship",
    "GetRelationship",
    "ListRelationships",
]
ALL_RPCS = [("registry", r) for r in REGISTRY_RPCS] + [
    ("relationships", r) for r in RELATIONSHIP_RPCS
]


def snapshot(registry, relationships, engine: Engine, w: World) -> dict[str, Any]:
    def participant(participant_id: str) -> bytes:
        return registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id=participant_id), metadata=ADMIN
        ).participant.SerializeToString(deterministic=True)

    listed = relationships.ListRelationships(
        relationship_pb2.ListRelationshipsRequest(holder_id=w.holder), metadata=APP
    )
    with engine.connect() as connection:
        merchants = connection.execute(
            select(func.count()).where(MerchantRow.merchant_id == w.new_merchant)
        ).scalar_one()
        items = connection.execute(
            select(func.count()).where(CatalogItemRow.item_code == w.new_item)
        ).scalar_one()
    try:
        participant(w.new_participant)
        new_participant = True
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        new_participant = False
    return {
        "holder": participant(w.holder),
        "relative": participant(w.relative),
        "spare": participant(w.spare),
        "relationships": [r.SerializeToString(deterministic=True) for r in listed.relationships],
        "new": (new_participant, merchants, items),
    }


def assert_refused(
    registry, relationships, engine, world, service: str, rpc: str, md: Metadata, code
) -> None:
    calls = (
        registry_calls(registry, world)
        if service == "registry"
        else relationship_calls(relationships, world)
    )
    before = snapshot(registry, relationships, engine, world)
    assert before["new"] == (False, 0, 0)
    with pytest.raises(grpc.RpcError) as caught:
        calls[rpc](md)
    assert caught.value.code() == code, caught.value.details()
    assert factories.error_info(caught.value).reason == code.name
    assert snapshot(registry, relationships, engine, world) == before
    assert factories.balance(registry, world.holder) == 70_000


BAD_CREDENTIALS = [
    pytest.param((), id="no-metadata"),
    pytest.param((("authorization", ""),), id="empty-header"),
    pytest.param((("authorization", "Bearer"),), id="bearer-without-token"),
    pytest.param((("authorization", "Bearer "),), id="bearer-space"),
    pytest.param((("authorization", "test-admin"),), id="token-without-scheme"),
    pytest.param((("authorization", "Basic dGVzdC1hZG1pbjp4"),), id="basic"),
    pytest.param((("authorization", "Token test-app"),), id="token-scheme"),
    pytest.param((("authorization", "Bearer-test-admin"),), id="no-separator"),
    pytest.param(bearer("no-such-token"), id="unknown-token"),
    pytest.param(bearer("test-admin-x"), id="token-with-suffix"),
    pytest.param(bearer("test-admi"), id="token-prefix"),
    pytest.param(bearer("TEST-ADMIN"), id="token-other-case"),
    pytest.param(
        (("x-principal", "admin"), ("x-channel", "APP"), ("x-merchant-id", "merchant-a")),
        id="identity-headers",
    ),
    pytest.param((("x-api-key", "test-admin"), ("token", "test-app")), id="token-elsewhere"),
]


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS)
@pytest.mark.parametrize(("service", "rpc"), ALL_RPCS)
def test_unauthenticated(registry, relationships, engine, world, service, rpc, credentials) -> None:
    assert_refused(
        registry,
        relationships,
        engine,
        world,
        service,
        rpc,
        credentials,
        grpc.StatusCode.UNAUTHENTICATED,
    )


WRONG_PRINCIPAL = [
    *[
        pytest.param("registry", rpc, token, id=f"{rpc}-{token}")
        for rpc in REGISTRY_RPCS
        for token in (
            "test-app",
            "test-platform",
            "test-window",
            "test-merchant-a",
            "test-merchant-b",
        )
    ],
    *[
        pytest.param("relationships", rpc, token, id=f"{rpc}-{token}")
        for rpc in RELATIONSHIP_RPCS
        for token in ("test-admin", "test-merchant-a", "test-merchant-b")
    ],
]


@pytest.mark.parametrize(("service", "rpc", "token"), WRONG_PRINCIPAL)
def test_wrong_principal_kind(registry, relationships, engine, world, service, rpc, token) -> None:
    assert_refused(
        registry,
        relationships,
        engine,
        world,
        service,
        rpc,
        bearer(token),
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_authentication_comes_before_validation(registry, relationships) -> None:
    """A caller without a good token learns nothing about the request, not even that it is
    malformed."""
    with pytest.raises(grpc.RpcError) as caught:
        registry.CreditPersonalAccount(
            registry_pb2.CreditPersonalAccountRequest(participant_id="", amount_fen=-1)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        relationships.AllocateQuota(
            relationship_pb2.AllocateQuotaRequest(relationship_id="x y"),
            metadata=bearer("test-merchant-a"),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_right_principal_is_served(registry, relationships, world) -> None:
    """Control: the same read calls succeed with the right kind of token."""
    assert registry_calls(registry, world)["GetParticipant"](ADMIN).participant.balance_fen
    for token in ("test-app", "test-platform", "test-window"):
        shown = relationship_calls(relationships, world)["GetRelationship"](bearer(token))
        assert shown.relationship.relationship_id == world.active
    # The scheme name is case-insensitive (RFC 6750 / RFC 7235); the token is not.
    assert registry_calls(registry, world)["GetParticipant"](
        (("authorization", "bearer test-admin"),)
    )


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("test-app", common_pb2.CHANNEL_APP),
        ("test-platform", common_pb2.CHANNEL_PROVINCIAL_PLATFORM),
        ("test-window", common_pb2.CHANNEL_SERVICE_WINDOW),
    ],
)
def test_channel_comes_from_the_token(registry, relationships, token, expected) -> None:
    """The channel recorded on a relationship is the token's, whatever else the call says."""
    holder = factories.employee(registry)
    relative = factories.resident(registry)
    metadata = (
        *bearer(token),
        ("x-channel", "SERVICE_WINDOW" if token == "test-app" else "APP"),
        ("x-principal", "admin"),
    )
    proposed = relationships.ProposeRelationship(
        relationship_pb2.ProposeRelationshipRequest(
            holder_id=holder, beneficiary_id=relative, relation=common_pb2.RELATION_PARENT
        ),
        metadata=metadata,
    ).relationship
    assert proposed.created_channel == expected
    shown = factories.relationship(relationships, proposed.relationship_id)
    assert shown.created_channel == expected


def test_ids_in_the_body_are_not_credentials(registry, relationships) -> None:
    """A body naming a token, a principal kind or a merchant is just data, never identity."""
    for participant_id in ("test-admin", "admin", "merchant-a"):
        with pytest.raises(grpc.RpcError) as caught:
            registry.GetParticipant(
                registry_pb2.GetParticipantRequest(participant_id=participant_id)
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            registry.GetParticipant(
                registry_pb2.GetParticipantRequest(participant_id=participant_id),
                metadata=bearer("test-merchant-a"),
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
