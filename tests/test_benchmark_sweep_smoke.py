"""`loadtest/benchmark.py --sweep-workers` at a tiny size, end to end (a file of its own: the
test runners spread files, and this one is long). No timing is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loadtest import benchmark
from tests.test_benchmark_smoke import TINY

pytestmark = pytest.mark.backend_neutral


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
