"""Conversions between protobuf messages and domain records.

Proto enum value names are the domain member names with the enum's prefix (SCHEME_EMPLOYEE <->
Scheme.EMPLOYEE), so one pair of functions maps every enum.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
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


# (proto enum wrapper, number, domain enum) -> member, for numbers that name a member: every
# call on the hot path converts a few enums, and the name lookups cost more than the rest of
# the conversion. Bounded by the enums' sizes (an unknown number raises and is not kept).
_MEMBERS: dict[tuple[Any, int, type[StrEnum]], Any] = {}
# (proto enum wrapper, domain member) -> number
_NUMBERS: dict[tuple[Any, StrEnum], int] = {}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)


def domain_enum(field: str, wrapper: Any, prefix: str, number: int, enum: type[E]) -> E:
    key = (wrapper, number, enum)
    member: E | None = _MEMBERS.get(key)
    if member is None:
        member = validation.choice(field, enum_name(wrapper, prefix, number), enum)
        _MEMBERS[key] = member
    return member


def proto_enum(wrapper: Any, prefix: str, member: StrEnum | None) -> Any:
    """The proto enum number (typed as the generated ValueType, hence Any) of a domain member."""
    if member is None:
        return 0
    key = (wrapper, member)
    number = _NUMBERS.get(key)
    if number is None:
        number = _NUMBERS[key] = wrapper.Value(f"{prefix}_{member.value}")
    return number


def timestamp(moment: datetime | None) -> Timestamp | None:
    """As Timestamp.FromDatetime (naive means UTC), in integer arithmetic on the time since
    the epoch rather than its Python calendar code: exact to the microsecond, ~10x cheaper."""
    if moment is None:
        return None
    since = moment - (_NAIVE_EPOCH if moment.tzinfo is None else _EPOCH)
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1_000)


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
