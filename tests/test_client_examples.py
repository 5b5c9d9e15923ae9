"""The three example flows (clients/examples) against the real service, with test tokens and
data set up through the API; the quota must move exactly as each flow says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from authz_server.generated.medwallet.v1 import common_pb2
from authz_server.runtime import demo
from clients.examples import _common, hospital_discharge, pharmacy_checkout, resident_premium
from tests import engine_factories as ef
from tests import factories
from tests.harness import Harness

ROOT = Path(__file__).resolve().parent.parent


def quota(relationships: Any, relationship_id: str) -> tuple[int, int, int]:
    shown = factories.relationship(relationships, relationship_id)
    return shown.available_fen, shown.held_fen, shown.spent_fen


def family(registry: Any, relationships: Any, quota_fen: int) -> tuple[str, str]:
    """A resident parent with `quota_fen` of shared quota: (parent, relationship id)."""
    holder = factories.employee(registry, balance_fen=quota_fen)
    parent = factories.resident(registry)
    relationship_id = factories.active_relationship(relationships, holder, parent, quota_fen)
    return parent, relationship_id


def test_defaults_are_the_demo_data() -> None:
    assert _common.DEMO_BENEFICIARY == demo.RELATIVE
    codes = {item.item_code: item.eligible for item in demo.ITEMS}
    assert codes[_common.DEMO_ELIGIBLE_ITEM] is True
    assert codes[_common.DEMO_INELIGIBLE_ITEM] is False
    kinds = {merchant.merchant_id: merchant.kind.name for merchant in demo.MERCHANTS}
    expected = {
        "pharmacy": "RETAIL_PHARMACY",
        "hospital": "MEDICAL_INSTITUTION",
        "collector": "PREMIUM_COLLECTOR",
    }
    for role, token in _common.DEMO_TOKENS.items():
        assert kinds[demo.DEMO_TOKENS[token]["merchant_id"]] == expected[role]


def test_pharmacy_checkout(
    harness: Harness, registry: Any, relationships: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ef.merchant(registry, ef.PHARMACY, common_pb2.MERCHANT_KIND_RETAIL_PHARMACY)
    codes = ef.items(registry)
    parent, relationship_id = family(registry, relationships, 50_000)
    code = pharmacy_checkout.main(
        [
            "--address", harness.address, "--token", "test-merchant-b", "--beneficiary", parent,
            "--eligible-item", codes["drug"], "--ineligible-item", codes["cosmetic"],
        ]
    )  # fmt: skip
    said = capsys.readouterr().out
    assert code == 0, said
    assert "partly approved: 47.00 yuan of 135.00 yuan" in said
    assert f"{codes['cosmetic']}: not paid from the quota (ITEM_NOT_ELIGIBLE)" in said
    assert "pays the other 88.00 yuan another way" in said
    assert "Captured 47.00 yuan" in said and "CAPTURED" in said
    assert quota(relationships, relationship_id) == (45_300, 0, 4_700)


def test_hospital_discharge(
    harness: Harness, registry: Any, relationships: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    parent, relationship_id = family(registry, relationships, 100_000)
    code = hospital_discharge.main(
        [
            "--address", harness.address, "--token", "test-merchant-a", "--beneficiary", parent,
            "--estimate-fen", "60000", "--bill-fen", "45000", "--refund-fen", "5000",
        ]
    )  # fmt: skip
    said = capsys.readouterr().out
    assert code == 0, said
    assert "approved in full: 600.00 yuan" in said
    assert "captured 450.00 yuan, and the other 150.00 yuan of the hold went back" in said
    assert f"50.00 yuan back to the quota of relationship {relationship_id}" in said
    assert "the patient paid 400.00 yuan from shared quota" in said
    assert quota(relationships, relationship_id) == (60_000, 0, 40_000)


def test_resident_premium_paid_in_full_or_refused(
    harness: Harness, registry: Any, relationships: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_PREMIUM_COLLECTOR)
    parent, relationship_id = family(registry, relationships, 50_000)
    argv = ["--address", harness.address, "--token", "test-merchant-a", "--beneficiary", parent]

    assert resident_premium.main([*argv, "--premium-fen", "40000"]) == 0
    said = capsys.readouterr().out
    assert "Paid in full: 400.00 yuan" in said and "Left in the quota: 100.00 yuan" in said
    assert quota(relationships, relationship_id) == (10_000, 0, 40_000)

    # The next year's premium is more than is left: refused whole, nothing charged. Run as a
    # module, the way an operator would.
    result = subprocess.run(
        [sys.executable, "-m", "clients.examples.resident_premium", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Refused: the quota holds 100.00 yuan, less than the premium" in result.stdout
    assert "nothing was charged" in result.stdout
    assert quota(relationships, relationship_id) == (10_000, 0, 40_000)


def test_a_refused_call_is_explained(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    code = hospital_discharge.main(
        ["--address", harness.address, "--token", "test-admin", "--beneficiary", "nobody"]
    )
    said = capsys.readouterr().out
    assert code == 1
    assert "The service refused a call: PERMISSION_DENIED" in said
