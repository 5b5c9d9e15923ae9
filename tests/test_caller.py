"""`medwallet-authz call` against the real service: every RPC of every .proto is reachable, errors
show the ErrorInfo reason and field with an exit code per class, bad input gets one clear line,
and answers use the proto field names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from authz_server import cli
from authz_server.generated.medwallet.v1 import (
    common_pb2,
    registry_pb2_grpc,
    relationship_pb2_grpc,
)
from tests import engine_factories as ef
from tests import factories
from tests.harness import Harness, new_id

pytestmark = pytest.mark.backend_neutral

ROOT = Path(__file__).resolve().parent.parent
TOKEN_BY_SERVICE = {
    "RegistryService": "test-admin",
    "SettlementService": "test-admin",
    "AuditService": "test-admin",
    "RelationshipService": "test-app",
    "AuthorizationService": "test-merchant-a",
}


def rpcs_in_protos() -> list[str]:
    """Service/Method for every rpc written in protos/ (read from the .proto text, not from the
    code under test)."""
    found = []
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        text = proto.read_text()
        for service, body in re.findall(r"service (\w+) \{(.*?)\n\}", text, re.DOTALL):
            found += [f"{service}/{rpc}" for rpc in re.findall(r"rpc (\w+)\(", body)]
    return found


class Caller:
    def __init__(self, harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
        self.port = str(harness.port)
        self.capsys = capsys

    def __call__(self, method: str, request: Any, token: str, *extra: str) -> tuple[int, str, str]:
        text = request if isinstance(request, str) else json.dumps(request)
        argv = ["call", method, text, "--token", token, "--host", "127.0.0.1", "--port", self.port]
        code = cli.main([*argv, *extra])
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def call(harness: Harness, capsys: pytest.CaptureFixture[str]) -> Caller:
    return Caller(harness, capsys)


def test_the_protos_have_the_services_the_readme_names() -> None:
    services = {name.split("/")[0] for name in rpcs_in_protos()}
    assert services == set(TOKEN_BY_SERVICE)
    assert len(rpcs_in_protos()) >= 20


@pytest.mark.parametrize("method", rpcs_in_protos())
def test_every_rpc_of_every_proto_is_reached(call: Caller, method: str) -> None:
    code, out, err = call(method, {}, TOKEN_BY_SERVICE[method.split("/")[0]])
    if code == 0:
        assert isinstance(json.loads(out), dict)
        return
    shown = json.loads(err)  # the server's status, not a local "unknown method"
    assert shown["code"] not in ("UNIMPLEMENTED", "UNAUTHENTICATED", "PERMISSION_DENIED"), shown
    assert shown["exit"] == code


def test_list_names_every_rpc(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["call", "--list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == set(rpcs_in_protos())


def test_error_shows_reason_and_field_with_the_exit_code_of_its_class(call: Caller) -> None:
    code, _, err = call("RegistryService/GetParticipant", {"participant_id": ""}, "test-admin")
    shown = json.loads(err)
    assert (code, shown["code"]) == (3, "INVALID_ARGUMENT")
    assert shown["metadata"]["field"] == "participant_id"
    assert shown["reason"]
    code, _, err = call("RegistryService/GetParticipant", {"participant_id": "nobody"}, "test-app")
    assert (code, json.loads(err)["code"]) == (4, "PERMISSION_DENIED")
    code, _, err = call("SettlementService/GetSettlementReport", {"month": "2001-01"}, "test-admin")
    assert (code, json.loads(err)["code"]) == (5, "NOT_FOUND")


def test_bad_input_gets_one_clear_line(call: Caller) -> None:
    method = "AuthorizationService/Authorize"
    code, _, err = call(method, "{'idempotency_key': 1", "test-merchant-a")
    assert code == 2 and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    code, _, err = call(method, {"beneficiary": "x"}, "test-merchant-a")
    assert code == 2 and "unknown field AuthorizeRequest.beneficiary" in err
    assert "beneficiary_id" in err and len(err.strip().splitlines()) == 1
    code, _, err = call(method, {"purpose": "CHEMIST"}, "test-merchant-a")
    assert code == 2 and "'CHEMIST' is not a value of Purpose" in err
    assert "PURPOSE_PHARMACY" in err and len(err.strip().splitlines()) == 1
    code, _, err = call("NoService/Nothing", {}, "test-merchant-a")
    assert code == 2 and "SettlementService/CloseMonth" in err


def test_short_enum_names_and_answers_in_proto_field_names(
    registry: registry_pb2_grpc.RegistryServiceStub,
    relationships: relationship_pb2_grpc.RelationshipServiceStub,
    call: Caller,
) -> None:
    ef.merchant(registry, "merchant-a", common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    holder, parent = factories.employee(registry, 100_000), factories.resident(registry)
    relationship_id = factories.active_relationship(relationships, holder, parent, 50_000)
    request = {
        "idempotency_key": new_id("k"),
        "beneficiary_id": parent,
        "purpose": "medical",
        "amount_fen": 1200,
    }
    code, out, err = call("AuthorizationService/Authorize", request, "test-merchant-a")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["decision"] == "DECISION_APPROVED"
    assert answer["approved_amount_fen"] == 1200  # snake_case, int64 as a number
    assert answer["funding"] == [{"relationship_id": relationship_id, "amount_fen": 1200}]
