"""The bounds at the edge (server/edge.py): a body that does not parse names what it is, and
oversized bodies and metadata are refused while the server goes on serving."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from authz_server.generated.medwallet.v1 import registry_pb2
from authz_server.settings import Settings
from tests.harness import ADMIN

pytestmark = pytest.mark.backend_neutral

BAD_UTF8_ID = b"\x0a\x03\xff\xfe\xfd"  # field 1 (participant_id), a string, bad UTF-8


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info


def test_bad_utf8_is_invalid_argument_naming_the_body(channel: grpc.Channel) -> None:
    call = channel.unary_unary("/medwallet.v1.RegistryService/GetParticipant")
    with pytest.raises(grpc.RpcError) as refused:
        call(BAD_UTF8_ID, metadata=ADMIN, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(refused.value)
    assert info.reason == "INVALID_ARGUMENT"
    assert info.metadata["field"] == "request"
    assert "medwallet.v1.GetParticipantRequest" in refused.value.details()


def test_oversized_body_is_refused(registry) -> None:
    huge = "x" * (Settings().max_request_bytes + 1)
    with pytest.raises(grpc.RpcError) as refused:
        registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id=huge), metadata=ADMIN, timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_oversized_metadata_is_refused_and_the_server_serves_on(registry) -> None:
    padding = (("x-padding", "y" * (Settings().max_metadata_bytes + 1)),)
    with pytest.raises(grpc.RpcError) as refused:
        registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id="nobody-here"),
            metadata=ADMIN + padding,
            timeout=5,
        )
    assert refused.value.code() not in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)
    with pytest.raises(grpc.RpcError) as answered:
        registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id="nobody-here"),
            metadata=ADMIN,
            timeout=5,
        )
    assert answered.value.code() == grpc.StatusCode.NOT_FOUND
