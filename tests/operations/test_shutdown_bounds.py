"""Every step of the stop sequence is bounded: a step that hangs (server.stop, as grpc.aio's can
after the grace, waiting for the core) is logged as a WARNING naming it and abandoned, and the
steps after it still run: the journal's last flush, closing Redis and SQL. A second SIGTERM
while the server drains is logged and ignored, and the process still exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, select

from authz_server.server import app as app_module
from authz_server.server.app import bounded_step
from authz_server.storage.sql.tables import AuthorizationRow
from tests.engine_factories import HOSPITAL_TOKEN, medical
from tests.harness import Harness, drop_database
from tests.operations.test_shutdown_and_workers import serving_hospital
from tests.test_journal_fast import decision


def _warnings_naming(caplog: pytest.LogCaptureFixture, step: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.levelno == logging.WARNING and getattr(record, "step", None) == step
    ]


def test_a_hanging_server_stop_does_not_hold_the_rest_of_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=app_module.__name__)
    harness = Harness(tmp_path, ledger_writer="thread")  # the in-process journal's stop
    app = harness.app
    real_stop = app.server.stop
    released = asyncio.Event()

    async def hanging_stop(grace: float | None) -> None:
        # Never ends, not even when cancelled, until the test releases it.
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    try:
        monkeypatch.setattr(app.server, "stop", hanging_stop)
        monkeypatch.setattr(app_module, "SERVER_STOP_MARGIN_SECONDS", 0.5)
        # Only the stop's journal step writes this decision: the journal's writer is stopped
        # first, and the decision waits in its queue.
        row = decision()

        async def queue_one() -> asyncio.Task[object]:
            journal = app.journal
            assert journal.task is not None
            journal.task.cancel()
            await asyncio.gather(journal.task, return_exceptions=True)
            journal.task = None
            return asyncio.get_running_loop().create_task(journal.write(dict(row)))

        queued = harness.run(queue_one())

        started = time.monotonic()
        unfinished = harness.run(app.stop(0), timeout=30)
        took = time.monotonic() - started

        assert unfinished == ["server_stop"]
        assert took < 10, took
        warnings = _warnings_naming(caplog, "server_stop")
        assert len(warnings) == 1, caplog.records
        assert "server_stop" in warnings[0].getMessage()
        # The steps after the hanging one ran: the journal was flushed to SQL ...
        engine = create_engine(harness.database_url)
        try:
            with engine.connect() as connection:
                found = connection.execute(
                    select(AuthorizationRow.authorization_id).where(
                        AuthorizationRow.authorization_id == row["authorization_id"]
                    )
                ).all()
        finally:
            engine.dispose()
        assert len(found) == 1
        assert queued.done() and queued.result() is None  # its caller was answered
        # ... the SQL threads were shut down ...
        with pytest.raises(RuntimeError):
            app.database.executor.submit(lambda: None)
        # ... and the Redis connections closed (only this check's own connection is left).
        if not os.environ.get("TEST_REDIS_URL"):  # the harness's private Redis
            with redis.Redis.from_url(harness.redis_url) as client:
                assert len(client.client_list()) == 1, client.client_list()
    finally:
        harness.loop.call_soon_threadsafe(released.set)
        harness.run(real_stop(None))
        harness.loop.call_soon_threadsafe(harness.loop.stop)
        harness.thread.join(5)
        harness.redis.stop()
        drop_database(harness.database_url)


@pytest.mark.backend_neutral  # no server, no database: asyncio alone
def test_bounded_step_gives_up_on_a_step_that_ignores_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=app_module.__name__)
    ran: list[str] = []
    finished = asyncio.Event()

    async def stubborn() -> None:
        # Ignores cancellation until the sequence below has finished.
        while not finished.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await finished.wait()

    async def failing() -> None:
        raise RuntimeError("broken")

    async def next_step() -> None:
        ran.append("next")

    async def sequence() -> tuple[list[bool], float]:
        started = time.monotonic()
        outcomes = [
            await bounded_step("stubborn", stubborn, 0.2),
            await bounded_step("failing", failing, 1),
            await bounded_step("next", next_step, 1),
        ]
        took = time.monotonic() - started
        finished.set()
        return outcomes, took

    outcomes, took = asyncio.run(sequence())
    assert took < 2, took
    assert outcomes == [False, False, True]
    assert ran == ["next"]
    assert len(_warnings_naming(caplog, "stubborn")) == 1
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert [getattr(record, "step", None) for record in errors] == ["failing"]


# a `serve` process on SQLite whatever TEST_DATABASE_URL says (ServerProcess drops DATABASE_URL)
@pytest.mark.backend_neutral
def test_second_sigterm_while_draining_is_ignored_and_exit_is_0(tmp_path: Path) -> None:
    with serving_hospital(tmp_path) as (server, redis_url, stub):
        # Hold every Redis command for 2 s: the calls below are in flight through both signals.
        redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "2000", "ALL")
        with ThreadPoolExecutor(4) as pool:
            calls = [
                pool.submit(stub.Authorize, medical(f"nobody-{i}", 100), metadata=HOSPITAL_TOKEN)
                for i in range(4)
            ]
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            answers = [call.result(timeout=30) for call in calls]
        assert all(answer.authorization_id for answer in answers)
        assert server.process.wait(30) == 0, server.output()
        output = server.output()
        assert "Traceback" not in output, output
        assert "while stopping, ignored" in output, output
        assert "did not finish within" not in output, output  # every step kept its bound
