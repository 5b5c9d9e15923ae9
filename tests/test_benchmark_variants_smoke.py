"""`loadtest/benchmark.py --systems variants` at a tiny size, end to end. No timing is
asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import benchmark
from tests.test_benchmark_smoke import TINY

pytestmark = pytest.mark.backend_neutral


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
        "--variant-repeats", "2", *TINY, "--capture-ops", "150", "--workers", "1",
        "--out", str(tmp_path),
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
