"""A short headless Locust run of loadtest/locustfile.py against the test server: every kind of
simulated user works, and the run ends with requests made and zero failures."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from authz_server.generated.medwallet.v1 import common_pb2, registry_pb2_grpc
from authz_server.generated.medwallet.v1 import relationship_pb2_grpc as relationship_grpc
from loadtest import benchmark, dataset
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


@pytest.mark.parametrize("text", ["Authorize", "Capture/uniform", "Authorize/hot", " , "])
def test_a_malformed_variant_phase_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        benchmark._phases(text)


@pytest.mark.parametrize(
    "text",
    ["no-colon", ":MEDWALLET_X=1", "a:RATE=1", "a:MEDWALLET_X", "a@/nonexistent:"],
)
def test_a_malformed_variant_is_refused(text: str) -> None:
    from loadtest import variants

    with pytest.raises(ValueError, match="--variant"):
        variants.parse(text)


def test_a_variant_setting_may_hold_commas() -> None:
    from loadtest import variants

    variant = variants.parse(
        "tight:MEDWALLET_MERCHANT_LIMIT=rate=10,burst=10,in_flight=5,MEDWALLET_ACCESS_LOG=false"
    )
    assert variant.settings == {
        "MEDWALLET_MERCHANT_LIMIT": "rate=10,burst=10,in_flight=5",
        "MEDWALLET_ACCESS_LOG": "false",
    }


def test_the_figures_are_written_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offline machine without matplotlib still gets benchmark.json (the chart is skipped,
    not the run failed after its phases)."""
    import argparse
    from datetime import UTC, datetime

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    arguments = argparse.Namespace(
        event_loop="asyncio", clients=1, concurrency=1, channels=1, authorize_ops=1,
        capture_ops=1, warmup=0, time_bound=1.0, relationships=1, database_url=None,
        baseline_database_url=None, out=tmp_path / "out",
    )  # fmt: skip
    run = benchmark.Run(arguments, tmp_path, 1)
    run.phases.append(benchmark.Phase("service", "Authorize", "uniform", operations=1))
    document = benchmark.write_results(run, "benchmark", datetime.now(UTC))
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text()) == json.loads(
        json.dumps(document)
    )
    assert not (tmp_path / "out" / "benchmark.png").exists()
    assert run.charts == []  # the closing line says "no chart", not a file that is not there


def test_py_spy_is_found_where_an_offline_install_puts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pip install --target SITE` (the offline bundle) puts py-spy in SITE/bin, on no PATH."""
    program = tmp_path / "site" / "bin" / "py-spy"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setattr(benchmark.shutil, "which", lambda *_args, **_kw: None)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "elsewhere"), str(tmp_path / "site")])
    assert benchmark.find_py_spy() == str(program)
    program.chmod(0o644)  # not a program
    assert benchmark.find_py_spy() is None
