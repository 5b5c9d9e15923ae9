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


# Seconds a benchmark phase may run (--time-bound). Only a loaded machine reaches it: the tiny
# phases take well under a second otherwise. The exhaustion check needs its phase to run until
# the quota is spent: at 1 s a phase on a loaded machine (CI's two pytest workers on two cores)
# stopped at 237 approvals of the 250 that fit, and the benchmark failed its check.
TIME_BOUND = "10"
# A tiny run: few relationships and operations, few calls in flight.
TINY = [
    "--relationships", "300", "--authorize-ops", "300", "--warmup", "20", "--concurrency", "8",
    "--time-bound", TIME_BOUND,
]  # fmt: skip


@pytest.mark.timeout(600)
def test_worker_sweep_writes_every_count_and_its_chart(tmp_path: Path) -> None:
    """`benchmark --sweep-workers 1,2` at a tiny size, no baseline: sweep.json has every worker
    count this machine has cores for, with positive figures, and sweep.png is drawn. No timing
    is asserted."""
    arguments = [
        "--sweep-workers", "1,2", "--no-baseline", "--systems", "floor,service", *TINY,
        "--capture-ops", "150", "--out", str(tmp_path),
    ]  # fmt: skip
    database_url = os.environ.get("TEST_DATABASE_URL")
    if database_url:
        arguments += ["--database-url", database_url]
    assert benchmark.main(arguments) == 0
    document = json.loads((tmp_path / "sweep.json").read_text())
    assert (tmp_path / "sweep.png").stat().st_size > 0
    counts = [n for n in (1, 2) if n <= (os.cpu_count() or 1)]
    assert document["settings"]["worker_counts"] == counts
    rows = document["rows"]
    paced = [r for r in rows if r["workload"] == "paced"]
    assert sorted(r["workers"] for r in paced if r["system"] == "service") == counts
    for row in paced:  # the service's Authorize again, at 80% of the pace it just reached
        assert row["system"] == "service" and row["operation"] == "Authorize", row
        assert row["pace_ops_per_s"] > 0 and row["p99_ms"] > 0 and row["errors"] == 0, row
        assert row["efficiency"] is None, row
    rows = [r for r in rows if r["workload"] != "paced"]
    for system in ("floor", "service"):
        for operation in ("Authorize", "Authorize+Capture"):
            found = [r for r in rows if (r["system"], r["operation"]) == (system, operation)]
            assert sorted({r["workers"] for r in found}) == counts, (system, operation)
            for row in found:
                for figure in ("throughput", "server_cpu_us", "p50_ms", "p99_ms", "efficiency"):
                    assert row[figure] > 0, (row, figure)
                assert row["errors"] == 0, row
                if system == "service":
                    assert row["efficiency_vs_floor"] > 0, row
                    assert row["over_quota"] == 0, row
    for n in counts:
        assert (tmp_path / f"w{n}" / "benchmark.json").exists()


@pytest.mark.timeout(600)
def test_benchmark_measures_the_service_on_one_node_and_on_a_cluster(tmp_path: Path) -> None:
    """`benchmark --redis-cluster` at a tiny size: the service measured on one Redis node and on
    a 3-primary Redis Cluster in the same run, both with positive figures, no errors, no
    over-quota approval, the quotas checked after each, and the cluster/one-node ratios printed
    into the JSON. No timing is asserted."""
    arguments = [
        "--redis-cluster", "--no-baseline", "--systems", "service", *TINY,
        "--capture-ops", "150", "--workers", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    assert benchmark.main(arguments) == 0
    document = json.loads((tmp_path / "benchmark.json").read_text())
    for system in ("service", "service-cluster"):
        for operation in ("Authorize", "Authorize+Capture"):
            found = [
                phase
                for phase in document["phases"]
                if (phase["system"], phase["operation"]) == (system, operation)
            ]
            assert found, (system, operation)
            for phase in found:
                assert phase["throughput"] > 0 and phase["server_cpu_us"] > 0, phase
                assert not phase["errors"] and not phase["over_quota"], phase
                # its SQL batches, read from the service's metrics around the phase (with
                # MEDWALLET_LEDGER_WRITER=process the journal's forwarded by its writer)
                batches = phase["sql_batches"]
                assert batches["journal"]["rows"] >= batches["journal"]["batches"] > 0, batches
                if operation == "Authorize+Capture":
                    assert batches["captures"]["rows"] > 0, batches
        check = document["checks"][system]
        assert check["families_checked"] > 0, check
        assert check["approved_differs_from_store"] == 0, check
        assert check["conservation_broken"] == 0, check
    assert any(row["ratio"].endswith("cluster/one node throughput") for row in document["ratios"])


@pytest.mark.timeout(600)
def test_variants_alternate_settings_and_checkouts(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """`benchmark --systems variants` at a tiny size: a variant with a setting and one whose code
    comes from a checkout (this one, as another commit's worktree would be) are each measured in
    every round; the summary has each one's median and every repeat, and variants.png is
    drawn. No timing is asserted."""
    checkout = Path(__file__).resolve().parents[1]
    arguments = [
        "--no-baseline", "--systems", "variants", "--variant", "plain:",
        "--variant", f"checkout@{checkout}:MEDWALLET_RATE_LIMITS=false",
        "--variant-repeats", "2", *TINY, "--workers", "1", "--out", str(tmp_path),
        "--variant-phases", "Authorize/uniform,Authorize+Capture/uniform",
    ]  # fmt: skip
    assert benchmark.main(arguments) == 0
    closing = capfd.readouterr().out.strip().splitlines()[-1]
    assert closing.endswith("benchmark.json and variants.png"), closing  # the chart it drew
    document = json.loads((tmp_path / "benchmark.json").read_text())
    for phase in ("Authorize uniform", "Authorize+Capture uniform"):
        figures = document["checks"]["variants"][phase]
        assert list(figures) == ["plain", "checkout"]
        for values in figures.values():
            assert len(values["runs"]) == 2 and values["errors"] == 0, values
            assert values["server_cpu_us"] > 0 and values["ops_per_s"] > 0, values
    assert (tmp_path / "variants.png").stat().st_size > 0


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
