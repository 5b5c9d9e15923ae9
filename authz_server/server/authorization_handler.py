"""AuthorizationService handlers (merchant principal: the merchant is who the token says)."""

from __future__ import annotations

import re
from typing import Any

import grpc

from authz_server.domain import validation
from authz_server.domain.authorization import AuthorizeRequest, Line
from authz_server.domain.errors import InvalidArgument
from authz_server.domain.types import Purpose
from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
)
from authz_server.observability import metrics
from authz_server.observability.interceptor import annotate
from authz_server.server import convert
from authz_server.server.auth import Authenticator, PrincipalKind
from authz_server.server.errors import mapped
from authz_server.service.authorization import AuthorizationService, AuthorizeOutcome
from authz_server.service.idempotency import Idempotency
from authz_server.service.refunds import RefundOutcome
from authz_server.service.views import AuthorizationView

Context = grpc.aio.ServicerContext[Any, Any]
AUTHORIZATION_ID = re.compile(r"[0-9a-f]{32}")


def authorization_id(value: str) -> str:
    if not AUTHORIZATION_ID.fullmatch(value):
        raise InvalidArgument("authorization_id", "must be an id this service issued")
    return value


def _funding(parts: tuple[tuple[str, int], ...]) -> list[authorization_pb2.FundingPart]:
    return [authorization_pb2.FundingPart(relationship_id=r, amount_fen=a) for r, a in parts]


def authorize_response(outcome: AuthorizeOutcome) -> authorization_pb2.AuthorizeResponse:
    D = authorization_pb2.DeclineReason
    return authorization_pb2.AuthorizeResponse(
        authorization_id=outcome.authorization_id,
        decision=convert.proto_enum(authorization_pb2.Decision, "DECISION", outcome.decision),
        decline_reason=convert.proto_enum(D, "DECLINE_REASON", outcome.decline_reason),
        approved_amount_fen=outcome.approved_fen,
        line_results=[
            authorization_pb2.LineResult(
                item_code=line.item_code,
                approved=line.approved,
                decline_reason=convert.proto_enum(D, "DECLINE_REASON", line.decline_reason),
                approved_amount_fen=line.approved_amount_fen,
            )
            for line in outcome.lines
        ],
        funding=_funding(outcome.funding),
        remaining_quota_fen=outcome.remaining_fen,
        expires_at=convert.timestamp(outcome.expires_at),
        status=convert.proto_enum(
            authorization_pb2.AuthorizationStatus, "AUTHORIZATION_STATUS", outcome.status
        ),
    )


def authorization(view: AuthorizationView) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(
        authorization_id=view.authorization_id,
        merchant_id=view.merchant_id,
        beneficiary_id=view.beneficiary_id,
        purpose=convert.proto_enum(common_pb2.Purpose, "PURPOSE", view.purpose),
        status=convert.proto_enum(
            authorization_pb2.AuthorizationStatus, "AUTHORIZATION_STATUS", view.status
        ),
        approved_amount_fen=view.approved_fen,
        captured_amount_fen=view.captured_fen,
        refunded_amount_fen=view.refunded_fen,
        funding=_funding(view.funding),
        created_at=convert.timestamp(view.created_at),
        expires_at=convert.timestamp(view.expires_at),
        captured_funding=_funding(view.captured_funding),
        captured_at=convert.timestamp(view.captured_at),
    )


def _encode_refund(outcome: RefundOutcome) -> bytes:
    return authorization_pb2.RefundResponse(
        authorization=authorization(outcome.view),
        parts=[
            authorization_pb2.RefundPart(
                relationship_id=r, amount_fen=a, to_personal_account=to_account
            )
            for r, a, to_account in outcome.parts
        ],
    ).SerializeToString()


class AuthorizationHandler(authorization_pb2_grpc.AuthorizationServiceServicer):
    def __init__(self, service: AuthorizationService, auth: Authenticator) -> None:
        self.service = service
        self.auth = auth

    def _merchant(self, context: Context) -> str:
        principal = self.auth.require(context, PrincipalKind.MERCHANT)
        assert principal.merchant_id is not None
        return principal.merchant_id

    @mapped
    async def Authorize(
        self, request: authorization_pb2.AuthorizeRequest, context: Context
    ) -> authorization_pb2.AuthorizeResponse:
        merchant_id = self._merchant(context)
        domain_request = AuthorizeRequest(
            idempotency_key=validation.idempotency_key("idempotency_key", request.idempotency_key),
            merchant_id=merchant_id,
            beneficiary_id=validation.identifier("beneficiary_id", request.beneficiary_id),
            relationship_id=validation.optional_identifier(
                "relationship_id", request.relationship_id
            ),
            purpose=convert.domain_enum(
                "purpose", common_pb2.Purpose, "PURPOSE", request.purpose, Purpose
            ),
            lines=tuple(Line(x.item_code, x.quantity, x.amount_fen) for x in request.lines),
            amount_fen=request.amount_fen,
            allow_partial=request.allow_partial,
            capture=request.capture,
        )
        answer = await self.service.authorize(
            domain_request, convert.digest(request), authorize_response
        )
        # bytes: the answer SQL stored for the key before (Redis had lost it)
        response = (
            authorization_pb2.AuthorizeResponse.FromString(answer)
            if isinstance(answer, bytes)
            else answer
        )
        annotate(merchant=merchant_id, decision=authorization_pb2.Decision.Name(response.decision))
        return response

    @mapped
    async def Capture(
        self, request: authorization_pb2.CaptureRequest, context: Context
    ) -> authorization_pb2.CaptureResponse:
        merchant_id = self._merchant(context)
        identifier = authorization_id(request.authorization_id)
        if request.amount_fen:
            validation.amount_fen("amount_fen", request.amount_fen)
        key = validation.idempotency_key("idempotency_key", request.idempotency_key)
        # The answer is built once: for the idempotency record (on the SQL thread) and the reply.
        built: list[authorization_pb2.CaptureResponse] = []

        def encode(view: AuthorizationView) -> bytes:
            message = authorization_pb2.CaptureResponse(authorization=authorization(view))
            built[:] = [message]
            return message.SerializeToString()

        call = Idempotency(f"capture:{merchant_id}", key, convert.digest(request), encode)
        result = await self.service.capture(merchant_id, identifier, request.amount_fen, call)
        annotate(merchant=merchant_id)
        if isinstance(result, bytes):  # the first answer, as stored
            metrics.idempotent_replays.labels("Capture").inc()
            return authorization_pb2.CaptureResponse.FromString(result)
        metrics.captured_fen.labels(result.purpose.value).inc(result.captured_fen)
        if built and built[0].authorization.authorization_id == result.authorization_id:
            return built[0]
        return authorization_pb2.CaptureResponse(authorization=authorization(result))

    @mapped
    async def Void(
        self, request: authorization_pb2.VoidRequest, context: Context
    ) -> authorization_pb2.VoidResponse:
        merchant_id = self._merchant(context)
        identifier = authorization_id(request.authorization_id)
        view = await self.service.void(merchant_id, identifier)
        return authorization_pb2.VoidResponse(authorization=authorization(view))

    @mapped
    async def Refund(
        self, request: authorization_pb2.RefundRequest, context: Context
    ) -> authorization_pb2.RefundResponse:
        merchant_id = self._merchant(context)
        identifier = authorization_id(request.authorization_id)
        amount = validation.amount_fen("amount_fen", request.amount_fen)
        key = validation.idempotency_key("idempotency_key", request.idempotency_key)
        call = Idempotency(f"refund:{merchant_id}", key, convert.digest(request), _encode_refund)
        result = await self.service.refund(merchant_id, identifier, amount, call)
        annotate(merchant=merchant_id)
        if isinstance(result, bytes):
            metrics.idempotent_replays.labels("Refund").inc()
        else:
            metrics.refunded_fen.labels(result.view.purpose.value).inc(amount)
        encoded = result if isinstance(result, bytes) else _encode_refund(result)
        return authorization_pb2.RefundResponse.FromString(encoded)

    @mapped
    async def GetAuthorization(
        self, request: authorization_pb2.GetAuthorizationRequest, context: Context
    ) -> authorization_pb2.GetAuthorizationResponse:
        merchant_id = self._merchant(context)
        view = await self.service.get(merchant_id, authorization_id(request.authorization_id))
        return authorization_pb2.GetAuthorizationResponse(authorization=authorization(view))
