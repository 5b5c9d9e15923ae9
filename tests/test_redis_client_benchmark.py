"""loadtest/redis_client_benchmark.py runs to the end on one node and on the test cluster, and
every client it measures gets Authorize approved (it had failed at start unnoticed since the
hot state's generation was added; this keeps it running)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.backend_neutral

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_benchmark_runs_every_client_on_one_node_and_on_a_cluster() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.redis_client_benchmark", "--operations", "200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("one node", "cluster"))]
    measured = {line[22:48].strip() for line in rows if "not installed" not in line}
    assert {
        "pipelined",
        "redis-py pipeline",
        "redis-py cluster pipeline",
        "pipelined cluster router",
    } <= measured, rows
    assert len(rows) == 9, rows
