"""The SQLite log copied back by a thread of its own (storage/sql/wal_checkpointer.py): it runs
while the service writes, and a process killed with -9 while it commits and checkpoints loses no
committed row and leaves a database SQLite opens intact."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from authz_server.storage.sql.database import Database
from authz_server.storage.sql.wal_checkpointer import CHECKPOINT_INTERVAL_SECONDS

pytestmark = pytest.mark.backend_neutral


def commit_rows(database: Database, count: int) -> None:
    for number in range(count):
        database.core_transaction(
            lambda connection, number=number: connection.exec_driver_sql(
                "INSERT INTO rows (id, body) VALUES (?, ?)", (number, "x" * 500)
            )
        )


@pytest.mark.parametrize("checkpoints", [True, False])
def test_the_log_is_copied_into_the_database_between_commits(
    tmp_path: Path, checkpoints: bool
) -> None:
    """Far below the automatic checkpoint's 10,000 pages: only the thread copies the log, and the
    database file grows only by a checkpoint (in WAL mode commits go to the log)."""
    file = tmp_path / "ledger.sqlite3"
    database = Database(f"sqlite:///{file}")
    try:
        database.core_transaction(
            lambda connection: connection.exec_driver_sql(
                "CREATE TABLE rows (id INTEGER PRIMARY KEY, body TEXT)"
            )
        )
        if checkpoints:
            database.start_checkpoints()
        time.sleep(CHECKPOINT_INTERVAL_SECONDS * 3)
        before = file.stat().st_size
        commit_rows(database, 300)
        time.sleep(CHECKPOINT_INTERVAL_SECONDS * 4)
        grew = file.stat().st_size > before
    finally:
        database.close()
    assert grew is checkpoints


CHILD = """
import sys, time
from authz_server.storage.sql.database import Database
database = Database(sys.argv[1])
database.start_checkpoints()
number = 0
while True:
    database.core_transaction(
        lambda connection: connection.exec_driver_sql(
            "INSERT INTO rows (id, body) VALUES (?, ?)", (number, "x" * 2000)
        )
    )
    print(number, flush=True)  # committed
    number += 1
"""


def test_a_process_killed_while_it_commits_and_checkpoints_loses_no_committed_row(
    tmp_path: Path,
) -> None:
    file = tmp_path / "ledger.sqlite3"
    setup = sqlite3.connect(file)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, body TEXT)")
    setup.close()
    size_at_start = file.stat().st_size
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, f"sqlite:///{file}"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert child.stdout is not None
    committed: list[int] = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        committed.append(int(line))
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert len(committed) > 500, "the child hardly committed anything"
    check = sqlite3.connect(file)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        present = {row[0] for row in check.execute("SELECT id FROM rows")}
    finally:
        check.close()
    assert set(committed) <= present
    assert file.stat().st_size > size_at_start  # checkpoints ran while it committed
