"""A short headless Locust run of loadtest/locustfile.py against the test server: every kind of
simulated user works, and the run ends with requests made and zero failures."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from authz_server.generated.medwallet.v1 import common_pb2, registry_pb2_grpc
from authz_server.generated.medwallet.v1 import relationship_pb2_grpc as relationship_grpc
from loadtest import dataset
from tests import engine_factories as ef
from tests import factories
from tests.harness import TOKENS, Harness

pytestmark = pytest.mark.backend_neutral

ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = {
    "drug": ("DRUG", "true"),
    "device": ("DEVICE", "true"),
    "consumable": ("CONSUMABLE", "true"),
    "cosmetic": ("CONSUMABLE", "false"),
    "service": ("MEDICAL_SERVICE", "true"),
}


def write_data_set(
    directory: Path,
    registry: registry_pb2_grpc.RegistryServiceStub,
    relationships: relationship_grpc.RelationshipServiceStub,
) -> None:
    """Families, merchants and items made through the API, described in the CSV files the
    load test reads (the bulk loader's formats, as loadtest/generate_data.py writes them)."""
    ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    ef.merchant(registry, ef.PHARMACY, common_pb2.MERCHANT_KIND_RETAIL_PHARMACY)
    codes = ef.items(registry)
    people: list[list[object]] = []
    shares: list[list[object]] = []
    for _ in range(4):
        holder = factories.employee(registry, balance_fen=20_000_000, region="110100")
        relative = factories.resident(registry, region="440300")
        quota = 10_000_000
        relationship_id = factories.active_relationship(relationships, holder, relative, quota)
        people += [[holder, "EMPLOYEE", "110100"], [relative, "RESIDENT", "440300"]]
        shares.append([relationship_id, holder, relative, "PARENT", quota])
    dataset.write_csv(
        directory / dataset.PARTICIPANTS, ["participant_id", "scheme", "pooling_region"], people
    )
    dataset.write_csv(
        directory / dataset.RELATIONSHIPS,
        ["relationship_id", "holder_id", "beneficiary_id", "relation", "quota_fen"],
        shares,
    )
    dataset.write_csv(
        directory / dataset.MERCHANTS,
        ["merchant_id", "kind", "pooling_region", "designated", "name"],
        [
            [ef.HOSPITAL, "MEDICAL_INSTITUTION", "440300", "true", ef.HOSPITAL],
            [ef.PHARMACY, "RETAIL_PHARMACY", "440300", "true", ef.PHARMACY],
        ],
    )
    dataset.write_csv(
        directory / dataset.ITEMS,
        ["item_code", "name", "category", "eligible"],
        [[code, kind, *CATEGORIES[kind]] for kind, code in codes.items()],
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as data:
        return list(csv.DictReader(data))


@pytest.mark.timeout(180)
def test_headless_locust_run_has_requests_and_no_failures(
    harness: Harness,
    registry: registry_pb2_grpc.RegistryServiceStub,
    relationships: relationship_grpc.RelationshipServiceStub,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    write_data_set(data_dir, registry, relationships)
    tokens = harness.client_tokens  # the server's own file holds only digests
    workload = dataset.load_workload(data_dir, tokens)
    assert workload.merchants["RETAIL_PHARMACY"] == [(ef.PHARMACY, "test-merchant-b")]
    assert TOKENS["test-merchant-b"]["merchant_id"] == ef.PHARMACY
    prefix = tmp_path / "run"
    command = [
        sys.executable, "-m", "locust",
        "-f", str(ROOT / "loadtest" / "locustfile.py"),
        "--host", harness.address,
        "--headless", "-u", "12", "-r", "12", "-t", "5s",
        "--csv", str(prefix),
        "--data-dir", str(data_dir),
        "--tokens-file", str(tokens),
        "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LOCUST_")}
    result = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=150
    )
    output = f"{result.stdout}\n{result.stderr}"
    stats = {row["Name"]: row for row in read_rows(Path(f"{prefix}_stats.csv"))}
    total = stats["Aggregated"]
    assert int(total["Request Count"]) > 0, output
    assert int(total["Failure Count"]) == 0, read_rows(Path(f"{prefix}_failures.csv"))
    assert read_rows(Path(f"{prefix}_exceptions.csv")) == [], output
    for name in ("Authorize pharmacy", "Capture pharmacy"):
        assert int(stats[name]["Request Count"]) > 0, f"no {name!r} requests:\n{output}"
    assert result.returncode == 0, output
