"""Builders for test data through the real gRPC API, and error inspection."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from authz_server.generated.medwallet.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    relationship_pb2,
    relationship_pb2_grpc,
)
from tests.harness import ADMIN, APP, new_id


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo a refusal carries (reason, and field for INVALID_ARGUMENT)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {error}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo detail")


def employee(
    registry: registry_pb2_grpc.RegistryServiceStub, balance_fen: int = 0, region: str = "110100"
) -> str:
    participant_id = new_id("emp")
    registry.UpsertParticipant(
        registry_pb2.UpsertParticipantRequest(
            participant_id=participant_id, scheme=common_pb2.SCHEME_EMPLOYEE, pooling_region=region
        ),
        metadata=ADMIN,
    )
    if balance_fen:
        registry.CreditPersonalAccount(
            registry_pb2.CreditPersonalAccountRequest(
                participant_id=participant_id,
                amount_fen=balance_fen,
                idempotency_key=new_id("credit"),
            ),
            metadata=ADMIN,
        )
    return participant_id


def resident(registry: registry_pb2_grpc.RegistryServiceStub, region: str = "440300") -> str:
    participant_id = new_id("res")
    registry.UpsertParticipant(
        registry_pb2.UpsertParticipantRequest(
            participant_id=participant_id, scheme=common_pb2.SCHEME_RESIDENT, pooling_region=region
        ),
        metadata=ADMIN,
    )
    return participant_id


def active_relationship(
    relationships: relationship_pb2_grpc.RelationshipServiceStub,
    holder_id: str,
    beneficiary_id: str,
    quota_fen: int = 0,
    relation: int = common_pb2.RELATION_PARENT,
) -> str:
    proposed = relationships.ProposeRelationship(
        relationship_pb2.ProposeRelationshipRequest(
            holder_id=holder_id, beneficiary_id=beneficiary_id, relation=relation
        ),
        metadata=APP,
    )
    relationship_id = proposed.relationship.relationship_id
    for party in (common_pb2.PARTY_HOLDER, common_pb2.PARTY_BENEFICIARY):
        relationships.ConsentRelationship(
            relationship_pb2.ConsentRelationshipRequest(
                relationship_id=relationship_id, party=party
            ),
            metadata=APP,
        )
    if quota_fen:
        relationships.AllocateQuota(
            relationship_pb2.AllocateQuotaRequest(
                relationship_id=relationship_id,
                amount_fen=quota_fen,
                idempotency_key=new_id("alloc"),
            ),
            metadata=APP,
        )
    return relationship_id


def balance(registry: registry_pb2_grpc.RegistryServiceStub, participant_id: str) -> int:
    return registry.GetParticipant(
        registry_pb2.GetParticipantRequest(participant_id=participant_id), metadata=ADMIN
    ).participant.balance_fen


def relationship(
    relationships: relationship_pb2_grpc.RelationshipServiceStub, relationship_id: str
) -> relationship_pb2.Relationship:
    return relationships.GetRelationship(
        relationship_pb2.GetRelationshipRequest(relationship_id=relationship_id), metadata=APP
    ).relationship
