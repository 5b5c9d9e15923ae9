"""Conversions between protobuf messages and domain records.

Proto enum value names are the domain member names with the enum's prefix (SCHEME_EMPLOYEE <->
Scheme.EMPLOYEE), so one pair of functions maps every enum.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from authz_server.domain import validation
from authz_server.domain.model import Participant, QuotaView
from authz_server.generated.medwallet.v1 import (
    common_pb2,
    registry_pb2,
    relationship_pb2,
)

E = TypeVar("E", bound=StrEnum)


def enum_name(wrapper: Any, prefix: str, number: int) -> str | None:
    """The domain name of a proto enum number; None for UNSPECIFIED; unknown numbers pass
    through as text so validation can name them."""
    if number == 0:
        return None
    try:
        name: str = wrapper.Name(number)
    except ValueError:
        return str(number)
    return name.removeprefix(prefix + "_")


def domain_enum(field: str, wrapper: Any, prefix: str, number: int, enum: type[E]) -> E:
    return validation.choice(field, enum_name(wrapper, prefix, number), enum)


def proto_enum(wrapper: Any, prefix: str, member: StrEnum | None) -> Any:
    """The proto enum number (typed as the generated ValueType, hence Any) of a domain member."""
    if member is None:
        return 0
    return wrapper.Value(f"{prefix}_{member.value}")


def timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def digest(request: Message) -> str:
    """Identifies a request's content for idempotency (deterministic serialization)."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def participant(record: Participant) -> registry_pb2.Participant:
    return registry_pb2.Participant(
        participant_id=record.participant_id,
        scheme=proto_enum(common_pb2.Scheme, "SCHEME", record.scheme),
        pooling_region=record.pooling_region,
        status=proto_enum(common_pb2.ParticipantStatus, "PARTICIPANT_STATUS", record.status),
        balance_fen=record.balance_fen,
        updated_at=timestamp(record.updated_at),
    )


def relationship(view: QuotaView) -> relationship_pb2.Relationship:
    record = view.relationship
    return relationship_pb2.Relationship(
        relationship_id=record.relationship_id,
        holder_id=record.holder_id,
        beneficiary_id=record.beneficiary_id,
        relation=proto_enum(common_pb2.Relation, "RELATION", record.relation),
        status=proto_enum(common_pb2.RelationshipStatus, "RELATIONSHIP_STATUS", record.status),
        allocated_fen=record.totals.allocated_now_fen,
        available_fen=view.available_fen,
        held_fen=view.held_fen,
        spent_fen=record.totals.spent_fen,
        holder_consented=record.holder_consented,
        beneficiary_consented=record.beneficiary_consented,
        created_at=timestamp(record.created_at),
        activated_at=timestamp(record.activated_at),
        dissolved_at=timestamp(record.dissolved_at),
        dissolution_reason=proto_enum(
            common_pb2.DissolutionReason, "DISSOLUTION_REASON", record.dissolution_reason
        ),
        created_channel=proto_enum(common_pb2.Channel, "CHANNEL", record.created_channel),
    )
