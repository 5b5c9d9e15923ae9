"""`loadtest/benchmark.py` at a tiny size, end to end: the service on one Redis node and on a
cluster (the worker sweep and the variants have files of their own: the test runners spread
files). No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import benchmark

pytestmark = pytest.mark.backend_neutral

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
