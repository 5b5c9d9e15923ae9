"""loadtest/rebuild_benchmark.py at a tiny size: it fills a database consistently, the rebuilds
after each loss (here the published generation forgotten: the rebuild deletes what Redis kept
first) put every quota and open hold back, the sampled quotas in Redis equal SQL's, and the
reconciles while serving find no drift (the script fails otherwise). No timing is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from loadtest import rebuild_benchmark


def _run(arguments: list[str], stem: Path) -> Any:
    """Runs the benchmark on the tests' database (TEST_DATABASE_URL, else SQLite) and returns
    its JSON document; `stem` names its files, `{kind}` the database's."""
    database_url = os.environ.get("TEST_DATABASE_URL")
    if database_url:
        arguments = [*arguments, "--database-url", database_url]
    assert rebuild_benchmark.main(arguments) == 0
    stem = Path(str(stem).format(kind="postgresql" if database_url else "sqlite"))
    assert stem.with_suffix(".png").exists()
    return json.loads(stem.with_suffix(".json").read_text())


def test_rebuild_benchmark_runs_and_redis_equals_sql(tmp_path: Path) -> None:
    arguments = [
        "--relationships", "400", "--decisions", "6000", "--open-holds", "150", "--runs", "2",
        "--check", "400", "--reconciles", "2", "--out", str(tmp_path), "--pages-in-flight", "1,3",
        "--loss", "forget",
        # not the settlement's timing (--settle): it waits STALE_CAPTURE_SECONDS (30 s) first
        "--no-settle",
    ]  # fmt: skip
    document = _run(arguments, tmp_path / "rebuild-{kind}-400")
    assert [run["quotas"] for run in document["runs"]] == [400, 400]
    assert [run["open_holds"] for run in document["runs"]] == [150, 150]
    assert all(run["checked_quotas"] == 400 for run in document["runs"])
    assert [run["pages_in_flight"] for run in document["runs"]] == [1, 3]
    assert all(run["deleted_keys"] > 400 for run in document["runs"])  # Redis kept its keys
    assert [(run["quotas"], run["drifted"]) for run in document["reconciles"]] == [(400, 0)] * 2
    rows = document["fill"]["rows"]
    assert rows["authorizations"] == 6000 and rows["relationships"] == 400


def test_rebuild_benchmark_settles_the_put_back_holds(tmp_path: Path) -> None:
    """--settle (the default): after the last loss the sweeper settles every hold the rebuild put
    back as SQL says (STALE_CAPTURE_SECONDS after serving again: this test waits ~30 s): none
    captured, all open again (the benchmark waits until none is listed), and the reconcile after
    it finds no drift: the settlement changed no quota's money. Not "each once": in two CI
    rehearsals on PostgreSQL the sweeper's round gave 12 and 7 of the 120 to a second settle
    call, counted again (not reproduced here; the closing note of session 22)."""
    arguments = [
        "--relationships", "200", "--decisions", "2000", "--open-holds", "120", "--runs", "1",
        "--check", "200", "--reconciles", "1", "--out", str(tmp_path), "--loss", "flushall",
        "--timeout", "240",
    ]  # fmt: skip
    settled_before = {outcome: _settled(outcome) for outcome in ("captured", "not_captured")}
    document = _run(arguments, tmp_path / "rebuild-{kind}-200")
    settlement = document["settlement"]
    assert settlement is not None and settlement["holds"] >= 120
    settled = {outcome: _settled(outcome) - settled_before[outcome] for outcome in settled_before}
    assert settled["captured"] == 0 and settled["not_captured"] >= 120  # open holds again
    assert settlement["calls"] >= 1 and settlement["serving_to_settled_seconds"] > 0
    assert [(run["quotas"], run["drifted"]) for run in document["reconciles"]] == [(200, 0)]


def _settled(outcome: str) -> float:
    value = REGISTRY.get_sample_value("medwallet_captures_settled_total", {"outcome": outcome})
    return value or 0.0
