"""The message conversions' fast paths give what protobuf's own (slower) functions give."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from authz_server.domain.errors import InvalidArgument
from authz_server.domain.types import Decision, DeclineReason, Purpose
from authz_server.generated.medwallet.v1 import authorization_pb2, common_pb2
from authz_server.server import convert

pytestmark = pytest.mark.backend_neutral

moments = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)
)
offsets = st.sampled_from([None, UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5))])


@given(moments, offsets)
def test_timestamp_is_from_datetime(moment: datetime, offset: timezone | None) -> None:
    if offset is not None:
        moment = moment.replace(tzinfo=offset)
        if not datetime.min.replace(tzinfo=UTC) + timedelta(days=1) <= moment.astimezone(UTC):
            return  # outside datetime's range once moved to UTC
    expected = Timestamp()
    expected.FromDatetime(moment)
    assert convert.timestamp(moment) == expected


def test_no_moment_is_no_timestamp() -> None:
    assert convert.timestamp(None) is None


@pytest.mark.parametrize("member", list(Decision))
def test_proto_enum_numbers(member: Decision) -> None:
    for _ in range(2):  # the first call fills the cache, the second reads it
        number = convert.proto_enum(authorization_pb2.Decision, "DECISION", member)
        assert authorization_pb2.Decision.Name(number) == f"DECISION_{member.value}"
    assert convert.proto_enum(authorization_pb2.DeclineReason, "DECLINE_REASON", None) == 0


def test_domain_enum_members_and_refusals() -> None:
    for number in common_pb2.Purpose.values():
        if number == 0:
            continue
        for _ in range(2):
            member = convert.domain_enum("purpose", common_pb2.Purpose, "PURPOSE", number, Purpose)
            assert f"PURPOSE_{member.value}" == common_pb2.Purpose.Name(number)
    for bad in (0, 999):  # unset, and a number the contract does not have: refused every time
        for _ in range(2):
            with pytest.raises(InvalidArgument) as refused:
                convert.domain_enum("purpose", common_pb2.Purpose, "PURPOSE", bad, Purpose)
            assert refused.value.field == "purpose"
    reason = convert.domain_enum(
        "reason",
        authorization_pb2.DeclineReason,
        "DECLINE_REASON",
        authorization_pb2.DECLINE_REASON_INSUFFICIENT_QUOTA,
        DeclineReason,
    )
    assert reason is DeclineReason.INSUFFICIENT_QUOTA
