"""A rebuild of the hot state at start is counted with N > 1 workers too. The supervisor makes
Redis trustworthy before it spawns the workers (runtime/serving.py), and it has no metrics of its
own: its rebuild was logged but never counted, so MedWalletHotStateRebuilt (increase of
medwallet_hot_state_rebuilds_total) stayed silent for pods that found Redis empty when they
started (e.g. restarted by liveness during a Redis outage that lost the data), as deploy/ runs
them (MEDWALLET_WORKERS=2)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from tests.operations.server_process import ServerProcess


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the scrape:\n{text}")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_rebuild_at_start_is_counted(tmp_path: Path, workers: int) -> None:
    # a new data directory and private Redis: nothing trusted yet, the server rebuilds at start
    server = ServerProcess(tmp_path, workers=workers, MEDWALLET_ACCESS_LOG="false")
    try:
        server.wait_serving()
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10
            ) as page:
                text = page.read().decode()
            if "medwallet_health_serving 1.0" in text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        rebuilt = server.output().count("hot state rebuilt from SQL")
        assert rebuilt == 1, server.output()
        assert _sample(text, "medwallet_hot_state_rebuilds_total") == rebuilt
        assert _sample(text, "medwallet_hot_state_rebuild_seconds") > 0
        assert server.stop() == 0, server.output()
    finally:
        server.stop()
