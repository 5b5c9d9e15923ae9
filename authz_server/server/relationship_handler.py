"""RelationshipService handlers (channel principal; the channel is recorded on every change)."""

from __future__ import annotations

from typing import Any

import grpc

from authz_server.domain import validation
from authz_server.domain.errors import InvalidArgument
from authz_server.domain.types import Channel, Party, Relation
from authz_server.generated.medwallet.v1 import (
    common_pb2,
    relationship_pb2,
    relationship_pb2_grpc,
)
from authz_server.server import convert
from authz_server.server.auth import Authenticator, PrincipalKind
from authz_server.server.errors import mapped
from authz_server.service.idempotency import Idempotency
from authz_server.service.relationships import QuotaMoveResult, RelationshipService

Context = grpc.aio.ServicerContext[Any, Any]


def _party(number: int) -> Party:
    return convert.domain_enum("party", common_pb2.Party, "PARTY", number, Party)


def _encode_allocate(result: QuotaMoveResult) -> bytes:
    return relationship_pb2.AllocateQuotaResponse(
        relationship=convert.relationship(result.quota),
        holder_balance_fen=result.holder_balance_fen,
    ).SerializeToString()


def _encode_release(result: QuotaMoveResult) -> bytes:
    return relationship_pb2.ReleaseQuotaResponse(
        relationship=convert.relationship(result.quota),
        holder_balance_fen=result.holder_balance_fen,
    ).SerializeToString()


class RelationshipHandler(relationship_pb2_grpc.RelationshipServiceServicer):
    def __init__(self, service: RelationshipService, auth: Authenticator) -> None:
        self.service = service
        self.auth = auth

    def _channel(self, context: Context) -> Channel:
        principal = self.auth.require(context, PrincipalKind.CHANNEL)
        assert principal.channel is not None
        return principal.channel

    @mapped
    async def ProposeRelationship(
        self, request: relationship_pb2.ProposeRelationshipRequest, context: Context
    ) -> relationship_pb2.ProposeRelationshipResponse:
        channel = self._channel(context)
        holder_id = validation.identifier("holder_id", request.holder_id)
        beneficiary_id = validation.identifier("beneficiary_id", request.beneficiary_id)
        relation = convert.domain_enum(
            "relation", common_pb2.Relation, "RELATION", request.relation, Relation
        )
        view = await self.service.propose(holder_id, beneficiary_id, relation, channel)
        return relationship_pb2.ProposeRelationshipResponse(relationship=convert.relationship(view))

    @mapped
    async def ConsentRelationship(
        self, request: relationship_pb2.ConsentRelationshipRequest, context: Context
    ) -> relationship_pb2.ConsentRelationshipResponse:
        channel = self._channel(context)
        relationship_id = validation.identifier("relationship_id", request.relationship_id)
        view = await self.service.consent(relationship_id, _party(request.party), channel)
        return relationship_pb2.ConsentRelationshipResponse(relationship=convert.relationship(view))

    @mapped
    async def AllocateQuota(
        self, request: relationship_pb2.AllocateQuotaRequest, context: Context
    ) -> relationship_pb2.AllocateQuotaResponse:
        channel = self._channel(context)
        relationship_id = validation.identifier("relationship_id", request.relationship_id)
        amount = validation.amount_fen("amount_fen", request.amount_fen)
        key = validation.idempotency_key("idempotency_key", request.idempotency_key)
        call = Idempotency("allocate", key, convert.digest(request), _encode_allocate)
        result = await self.service.allocate(relationship_id, amount, call, channel)
        encoded = result if isinstance(result, bytes) else _encode_allocate(result)
        return relationship_pb2.AllocateQuotaResponse.FromString(encoded)

    @mapped
    async def ReleaseQuota(
        self, request: relationship_pb2.ReleaseQuotaRequest, context: Context
    ) -> relationship_pb2.ReleaseQuotaResponse:
        channel = self._channel(context)
        relationship_id = validation.identifier("relationship_id", request.relationship_id)
        amount = validation.amount_fen("amount_fen", request.amount_fen)
        key = validation.idempotency_key("idempotency_key", request.idempotency_key)
        call = Idempotency("release", key, convert.digest(request), _encode_release)
        result = await self.service.release(relationship_id, amount, call, channel)
        encoded = result if isinstance(result, bytes) else _encode_release(result)
        return relationship_pb2.ReleaseQuotaResponse.FromString(encoded)

    @mapped
    async def DissolveRelationship(
        self, request: relationship_pb2.DissolveRelationshipRequest, context: Context
    ) -> relationship_pb2.DissolveRelationshipResponse:
        channel = self._channel(context)
        relationship_id = validation.identifier("relationship_id", request.relationship_id)
        result = await self.service.dissolve(relationship_id, _party(request.party), channel)
        return relationship_pb2.DissolveRelationshipResponse(
            relationship=convert.relationship(result.quota), returned_fen=result.returned_fen
        )

    @mapped
    async def GetRelationship(
        self, request: relationship_pb2.GetRelationshipRequest, context: Context
    ) -> relationship_pb2.GetRelationshipResponse:
        self._channel(context)
        relationship_id = validation.identifier("relationship_id", request.relationship_id)
        view = await self.service.get(relationship_id)
        return relationship_pb2.GetRelationshipResponse(relationship=convert.relationship(view))

    @mapped
    async def ListRelationships(
        self, request: relationship_pb2.ListRelationshipsRequest, context: Context
    ) -> relationship_pb2.ListRelationshipsResponse:
        self._channel(context)
        which = request.WhichOneof("party_filter")
        holder_id = beneficiary_id = None
        if which == "holder_id":
            holder_id = validation.identifier("holder_id", request.holder_id)
        elif which == "beneficiary_id":
            beneficiary_id = validation.identifier("beneficiary_id", request.beneficiary_id)
        else:
            raise InvalidArgument("holder_id", "set holder_id or beneficiary_id")
        page_token = validation.page_token("page_token", request.page_token)
        views, token = await self.service.list(
            holder_id, beneficiary_id, request.page_size, page_token
        )
        return relationship_pb2.ListRelationshipsResponse(
            relationships=[convert.relationship(v) for v in views], next_page_token=token
        )
