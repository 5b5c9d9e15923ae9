"""The operators' CLI (clients/cli.py) against the real service: registry loads, relationships,
payments, JSON output, errors with the idempotency key to finish with, and usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from authz_server.generated.medwallet.v1 import common_pb2
from clients import cli
from tests import engine_factories as ef
from tests import factories
from tests.harness import Harness, new_id

pytestmark = pytest.mark.backend_neutral

ROOT = Path(__file__).resolve().parent.parent


class Cli:
    def __init__(self, address: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.address = address
        self.capsys = capsys

    def run(self, token: str | None, *argv: str) -> tuple[int, Any, Any]:
        """(exit code, stdout as JSON or None, stderr as JSON or its text)."""
        prefix = ["--address", self.address] + (["--token", token] if token else [])
        code = cli.main([*prefix, *argv])
        out, err = self.capsys.readouterr()
        try:
            shown_err: Any = json.loads(err) if err else None
        except json.JSONDecodeError:
            shown_err = err
        return code, json.loads(out) if out else None, shown_err

    def ok(self, token: str | None, *argv: str) -> Any:
        code, out, err = self.run(token, *argv)
        assert code == 0, err
        return out


@pytest.fixture
def run(harness: Harness, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(harness.address, capsys)


def test_registry_relationship_and_payment_commands(run: Cli, tmp_path: Path) -> None:
    holder, parent = new_id("emp"), new_id("res")
    created = run.ok(
        "test-admin",
        "registry",
        "participant",
        holder,
        "--scheme",
        "employee",
        "--region",
        "110100",
    )
    assert created["created"] is True and created["participant"]["scheme"] == "EMPLOYEE"
    participants = tmp_path / "participants.csv"
    participants.write_text(
        f"participant_id,scheme,pooling_region\n{parent},RESIDENT,440300\n\n"
        f"{new_id('x')},ALIEN,440300\n"
    )
    code, loaded, _ = run.run("test-admin", "registry", "participant", "--csv", str(participants))
    assert code == 1  # one row refused, the others loaded
    assert loaded["loaded"] == 1 and [r["line"] for r in loaded["rejected"]] == [4]
    credited = run.ok("test-admin", "registry", "credit", holder, "--amount-fen", "100000")
    assert credited["balance_fen"] == 100_000 and credited["idempotency_key"]
    shown = run.ok("test-admin", "registry", "get-participant", holder)
    assert shown["balance_fen"] == 100_000

    merchant = run.ok(
        "test-admin", "registry", "merchant", "merchant-b", "--kind", "retail-pharmacy",
        "--region", "440300", "--name", "Till B",
    )  # fmt: skip
    assert merchant == {
        "merchant_id": "merchant-b",
        "kind": "RETAIL_PHARMACY",
        "pooling_region": "440300",
        "designated": True,
        "name": "Till B",
    }
    drug, cream = new_id("drug"), new_id("cream")
    items = tmp_path / "items.csv"
    items.write_text(f"item_code,name,category,eligible\n{cream},Face cream,CONSUMABLE,false\n")
    upserted = run.ok(
        "test-admin", "registry", "items", "--item", f"{drug}:drug:true:Amoxicillin",
        "--csv", str(items),
    )  # fmt: skip
    assert upserted == {"upserted_count": 2}

    proposed = run.ok(
        "test-app", "relationship", "propose", "--holder", holder, "--beneficiary", parent,
        "--relation", "parent",
    )  # fmt: skip
    relationship_id = proposed["relationship_id"]
    assert proposed["status"] == "PENDING_CONSENT" and proposed["created_channel"] == "APP"
    run.ok("test-app", "relationship", "consent", relationship_id, "--party", "holder")
    active = run.ok(
        "test-app", "relationship", "consent", relationship_id, "--party", "BENEFICIARY"
    )
    assert active["status"] == "ACTIVE"
    allocated = run.ok(
        "test-app", "relationship", "allocate", relationship_id, "--amount-fen", "60000"
    )
    assert allocated["holder_balance_fen"] == 40_000
    released = run.ok(
        "test-app", "relationship", "release", relationship_id, "--amount-fen", "10000"
    )
    assert released["relationship"]["available_fen"] == 50_000
    listed = run.ok("test-app", "relationship", "list", "--beneficiary", parent, "--all")
    assert [r["relationship_id"] for r in listed["relationships"]] == [relationship_id]

    paid = run.ok(
        "test-merchant-b", "authorize", "--beneficiary", parent, "--purpose", "pharmacy",
        "--line", f"{drug}:2:4700", "--line", f"{cream}:1:8800", "--allow-partial",
    )  # fmt: skip
    assert paid["decision"] == "PARTIALLY_APPROVED" and paid["approved_amount_fen"] == 4_700
    assert [line["decline_reason"] for line in paid["line_results"]] == [
        None,
        "ITEM_NOT_ELIGIBLE",
    ]
    authorization_id = paid["authorization_id"]
    captured = run.ok("test-merchant-b", "capture", authorization_id, "--amount-fen", "4000")
    assert (captured["status"], captured["captured_amount_fen"]) == ("CAPTURED", 4_000)
    refunded = run.ok("test-merchant-b", "refund", authorization_id, "--amount-fen", "1000")
    assert refunded["authorization"]["refunded_amount_fen"] == 1_000
    assert refunded["parts"] == [
        {"relationship_id": relationship_id, "amount_fen": 1_000, "to_personal_account": False}
    ]
    got = run.ok("test-merchant-b", "get", authorization_id)
    assert (got["captured_amount_fen"], got["refunded_amount_fen"]) == (4_000, 1_000)

    held = run.ok(
        "test-merchant-b", "authorize", "--beneficiary", parent, "--purpose", "pharmacy",
        "--line", f"{drug}:1:1000",
    )  # fmt: skip
    voided = run.ok("test-merchant-b", "void", held["authorization_id"])
    assert voided["status"] == "VOIDED"

    quota = run.ok("test-app", "relationship", "get", relationship_id)
    assert (quota["available_fen"], quota["held_fen"], quota["spent_fen"]) == (47_000, 0, 3_000)
    dissolved = run.ok("test-app", "relationship", "dissolve", relationship_id, "--party", "holder")
    assert dissolved["returned_fen"] == 47_000
    assert dissolved["relationship"]["dissolution_reason"] == "VOLUNTARY"


def test_failure_prints_the_error_and_the_key_to_finish_with(
    run: Cli, registry: Any, relationships: Any
) -> None:
    ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    holder = factories.employee(registry, balance_fen=10_000)
    parent = factories.resident(registry)
    factories.active_relationship(relationships, holder, parent, 10_000)

    paid = run.ok(
        "test-merchant-a", "authorize", "--beneficiary", parent, "--purpose", "medical",
        "--amount-fen", "3000",
    )  # fmt: skip
    again = run.ok(
        "test-merchant-a", "authorize", "--beneficiary", parent, "--purpose", "medical",
        "--amount-fen", "3000", "--idempotency-key", paid["idempotency_key"],
    )  # fmt: skip
    assert again == paid  # the original answer; charged once

    code, out, err = run.run(
        "test-merchant-a", "authorize", "--beneficiary", parent, "--purpose", "medical",
        "--amount-fen", "5000", "--idempotency-key", paid["idempotency_key"],
    )  # fmt: skip
    assert (code, out) == (6, None)  # ALREADY_EXISTS: refused in this state
    assert err["error"]["reason"] == "IDEMPOTENCY_KEY_REUSED"
    assert err["idempotency_key"] == paid["idempotency_key"]

    code, _, err = run.run(
        "test-merchant-a", "capture", paid["authorization_id"], "--amount-fen", "-1"
    )
    assert code == 3
    assert (err["error"]["code"], err["error"]["field"]) == ("INVALID_ARGUMENT", "amount_fen")

    code, _, err = run.run("test-app", "registry", "get-participant", holder)
    assert (code, err["error"]["code"]) == (4, "PERMISSION_DENIED")


def test_token_from_the_environment_and_usage_errors(
    run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = new_id("emp")
    monkeypatch.setenv("MEDWALLET_TOKEN", "test-admin")
    created = run.ok(
        None, "registry", "participant", holder, "--scheme", "employee", "--region", "110100"
    )
    assert created["participant"]["participant_id"] == holder

    code, _, err = run.run(None, "registry", "participant", holder)
    assert code == 2 and "--scheme" in err
    code, _, err = run.run(None, "authorize", "--beneficiary", holder, "--purpose", "pharmacy")
    assert code == 2 and "--amount-fen" in err
    for argv in (
        ["authorize", "--beneficiary", holder, "--purpose", "lunch", "--amount-fen", "1"],
        ["authorize", "--beneficiary", holder, "--purpose", "pharmacy", "--line", "drug:one:5"],
        ["capture", "some-id", "--amount-fen", "12.50"],
        ["relationship", "list"],
    ):
        with pytest.raises(SystemExit) as usage:
            run.run(None, *argv)
        assert usage.value.code == 2
        assert "error" in run.capsys.readouterr().err


def test_runs_as_a_module(harness: Harness) -> None:
    missing = uuid.uuid4().hex  # shaped like an authorization id, but nobody's
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "--address", harness.address, "get", missing],
        cwd=ROOT,
        env={"MEDWALLET_TOKEN": "test-merchant-a", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 5, result.stderr
    assert json.loads(result.stderr)["error"]["code"] == "NOT_FOUND"


def test_settlement_commands_reach_the_settlement_service(run: Cli) -> None:
    code, _, err = run.run("test-admin", "settlement", "report", "2001-01")
    assert (code, err["error"]["code"]) == (5, "NOT_FOUND")  # a month never closed
    code, _, err = run.run("test-admin", "settlement", "close", "2999-01")
    assert (code, err["error"]["reason"]) == (6, "MONTH_NOT_ENDED")
    code, _, err = run.run("test-app", "settlement", "report", "2001-01")
    assert (code, err["error"]["code"]) == (4, "PERMISSION_DENIED")
