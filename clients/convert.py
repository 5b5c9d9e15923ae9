"""Conversions between the generated protobuf messages and the client's dataclasses."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar, cast

from google.protobuf import timestamp_pb2

from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    registry_pb2,
    relationship_pb2,
)
from clients import model

E = TypeVar("E", bound=Enum)


def enum_of(kind: type[E], number: int) -> E:
    """The member for a proto enum number; UNSPECIFIED for a number this client does not know
    (a newer server may add values; proto3 enums are open)."""
    try:
        return kind(number)
    except ValueError:
        return kind["UNSPECIFIED"]


def reason_of(number: int) -> model.DeclineReason | None:
    reason = enum_of(model.DeclineReason, number)
    return None if reason is model.DeclineReason.UNSPECIFIED else reason


def proto_enum(member: Enum) -> Any:
    """The proto enum number of a member (typed Any: the stubs use a NewType per enum)."""
    return cast(int, member.value)


def timestamp(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    value: timestamp_pb2.Timestamp = getattr(message, field)
    return value.ToDatetime(tzinfo=UTC)


def funding(parts: Any) -> tuple[model.FundingPart, ...]:
    return tuple(model.FundingPart(part.relationship_id, part.amount_fen) for part in parts)


def authorize_result(
    response: authorization_pb2.AuthorizeResponse, idempotency_key: str
) -> model.AuthorizeResult:
    return model.AuthorizeResult(
        authorization_id=response.authorization_id,
        decision=enum_of(model.Decision, response.decision),
        decline_reason=reason_of(response.decline_reason),
        approved_amount_fen=response.approved_amount_fen,
        line_results=tuple(
            model.LineResult(
                item_code=line.item_code,
                approved=line.approved,
                decline_reason=reason_of(line.decline_reason),
                approved_amount_fen=line.approved_amount_fen,
            )
            for line in response.line_results
        ),
        funding=funding(response.funding),
        remaining_quota_fen=response.remaining_quota_fen,
        expires_at=timestamp(response, "expires_at"),
        status=enum_of(model.AuthorizationStatus, response.status),
        idempotency_key=idempotency_key,
    )


def authorization(message: authorization_pb2.Authorization) -> model.Authorization:
    return model.Authorization(
        authorization_id=message.authorization_id,
        merchant_id=message.merchant_id,
        beneficiary_id=message.beneficiary_id,
        purpose=enum_of(model.Purpose, message.purpose),
        status=enum_of(model.AuthorizationStatus, message.status),
        approved_amount_fen=message.approved_amount_fen,
        captured_amount_fen=message.captured_amount_fen,
        refunded_amount_fen=message.refunded_amount_fen,
        funding=funding(message.funding),
        created_at=timestamp(message, "created_at"),
        expires_at=timestamp(message, "expires_at"),
        captured_funding=funding(message.captured_funding),
        captured_at=timestamp(message, "captured_at"),
    )


def refund_result(response: authorization_pb2.RefundResponse) -> model.RefundResult:
    return model.RefundResult(
        authorization=authorization(response.authorization),
        parts=tuple(
            model.RefundPart(part.relationship_id, part.amount_fen, part.to_personal_account)
            for part in response.parts
        ),
    )


def relationship(message: relationship_pb2.Relationship) -> model.Relationship:
    reason = enum_of(model.DissolutionReason, message.dissolution_reason)
    return model.Relationship(
        relationship_id=message.relationship_id,
        holder_id=message.holder_id,
        beneficiary_id=message.beneficiary_id,
        relation=enum_of(model.Relation, message.relation),
        status=enum_of(model.RelationshipStatus, message.status),
        allocated_fen=message.allocated_fen,
        available_fen=message.available_fen,
        held_fen=message.held_fen,
        spent_fen=message.spent_fen,
        holder_consented=message.holder_consented,
        beneficiary_consented=message.beneficiary_consented,
        created_at=timestamp(message, "created_at"),
        activated_at=timestamp(message, "activated_at"),
        dissolved_at=timestamp(message, "dissolved_at"),
        dissolution_reason=None if reason is model.DissolutionReason.UNSPECIFIED else reason,
        created_channel=enum_of(model.Channel, message.created_channel),
    )


def participant(message: registry_pb2.Participant) -> model.Participant:
    return model.Participant(
        participant_id=message.participant_id,
        scheme=enum_of(model.Scheme, message.scheme),
        pooling_region=message.pooling_region,
        status=enum_of(model.ParticipantStatus, message.status),
        balance_fen=message.balance_fen,
        updated_at=timestamp(message, "updated_at"),
    )


def merchant(message: registry_pb2.Merchant) -> model.Merchant:
    return model.Merchant(
        merchant_id=message.merchant_id,
        kind=enum_of(model.MerchantKind, message.kind),
        pooling_region=message.pooling_region,
        designated=message.designated,
        name=message.name,
    )


def merchant_message(value: model.Merchant) -> registry_pb2.Merchant:
    return registry_pb2.Merchant(
        merchant_id=value.merchant_id,
        kind=proto_enum(value.kind),
        pooling_region=value.pooling_region,
        designated=value.designated,
        name=value.name,
    )


def item_message(value: model.CatalogItem) -> registry_pb2.CatalogItem:
    return registry_pb2.CatalogItem(
        item_code=value.item_code,
        name=value.name,
        category=proto_enum(value.category),
        eligible=value.eligible,
    )


def line_message(line: model.AuthorizationLine) -> authorization_pb2.AuthorizationLine:
    return authorization_pb2.AuthorizationLine(
        item_code=line.item_code, quantity=line.quantity, amount_fen=line.amount_fen
    )
