"""A capture batch that has read its time in January and stalls before its rows are written
(a slow disk, a paused process) while January closes (audit): the close waits for it, and the
capture is settled in January, whose report then holds it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from authz_server.domain.settlement import Month
from authz_server.storage.sql import capture_batch
from tests.test_settlement_races import World


@pytest.fixture()
def world(tmp_path: Path) -> Any:
    built = World(tmp_path)
    yield built
    built.close()


def test_the_close_waits_for_a_batch_that_read_its_time_in_the_month(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = world.harness.app
    in_batch = threading.Event()
    release = threading.Event()
    real_write = capture_batch.write

    def stalled_write(connection: Any, accepted: Any) -> None:
        in_batch.set()
        release.wait(30)
        real_write(connection, accepted)

    monkeypatch.setattr(capture_batch, "write", stalled_write)
    world.at(2025, 1, 31, 23, 59, 59, microsecond=500_000)
    capturing = threading.Thread(target=world.capture)
    capturing.start()
    assert in_batch.wait(20)
    world.at(2025, 2, 1, 0, 0, 31)
    future = asyncio.run_coroutine_threadsafe(
        app.settlement.close_month(Month(2025, 1)), world.harness.loop
    )
    done_early = True
    try:
        future.result(2)
    except TimeoutError:
        done_early = False
    release.set()
    capturing.join(30)
    report, _ = future.result(30)
    assert not done_early, "the close did not wait for the capture in flight"
    assert report.captured_fen == 1_000
    world.at(2025, 3, 5, 12)
    assert world.settled("2025-01", "2025-02") == (1_000, 0)
