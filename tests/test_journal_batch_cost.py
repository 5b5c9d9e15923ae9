"""The journal's batch-cost benchmark runs end to end on a real SQLite file and reports each
size it was asked for (loadtest/journal_batch_cost.py)."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import journal_batch_cost


def test_it_writes_every_batch_size_and_its_figures(tmp_path: Path) -> None:
    assert journal_batch_cost.main(["--sizes", "1,4", "--rows", "8", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "journal-batch-cost.json").read_text())
    assert [r["batch_rows"] for r in results] == [1, 4]
    assert [r["rows"] for r in results] == [8, 8]
    assert all(r["cpu_us_per_row"] > 0 and r["wall_ms_per_batch"] > 0 for r in results)
    # a batch of four costs less per row than four batches of one (the transaction's fixed cost)
    assert results[1]["cpu_us_per_batch"] < 4 * results[0]["cpu_us_per_batch"]
