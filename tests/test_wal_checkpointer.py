"""The SQLite log copied back by a thread of its own (storage/sql/wal_checkpointer.py): it runs
while the service writes, one process per file, picks up a file switched to WAL after it
connected, and a process killed with -9 while the thread copies loses no committed row and
leaves a database SQLite opens intact."""

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
from authz_server.storage.sql.wal_checkpointer import CHECKPOINT_INTERVAL_SECONDS, WalCheckpointer
from tests.harness import Harness

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
            "INSERT INTO rows (id, body) VALUES (?, ?)", (number, "x" * 500)
        )
    )
    print(number, flush=True)  # committed
    number += 1
    time.sleep(0.001)  # ~1,500 commits in the test's 2 s: far below the automatic checkpoint
"""


def test_a_process_killed_while_the_thread_copies_loses_no_committed_row(tmp_path: Path) -> None:
    """Below the automatic checkpoint's threshold, only the thread copies the log into the file
    (it grows); the process is killed while it commits and the thread copies."""
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
    # From its first commit on, not from its start: on a loaded machine the child's imports
    # alone took most of 2 s (a CI rehearsal beside another test run: "hardly committed").
    first = child.stdout.readline()
    if first:
        committed.append(int(first))
    deadline = time.monotonic() + 2.0
    while first and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        committed.append(int(line))
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert len(committed) > 300, "the child hardly committed anything"
    grew = file.stat().st_size > size_at_start  # before SQLite replays the log on opening
    check = sqlite3.connect(file)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        present = {row[0] for row in check.execute("SELECT id FROM rows")}
    finally:
        check.close()
    assert set(committed) <= present
    assert grew, "the thread never copied the log while the child committed"


def test_a_file_switched_to_wal_after_the_thread_connected_is_checkpointed(
    tmp_path: Path,
) -> None:
    file = tmp_path / "ledger.sqlite3"
    setup = sqlite3.connect(file, isolation_level=None)
    setup.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, body TEXT)")  # rollback journal
    checkpointer = WalCheckpointer(file, interval_seconds=0.02)
    checkpointer.start()
    try:
        time.sleep(0.1)  # it has connected, and found no log
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("PRAGMA wal_autocheckpoint=0")  # only the thread may copy
        size = file.stat().st_size
        for number in range(300):
            setup.execute("INSERT INTO rows (id, body) VALUES (?, ?)", (number, "x" * 500))
        deadline = time.monotonic() + 5
        while file.stat().st_size == size and time.monotonic() < deadline:
            time.sleep(0.02)
        assert file.stat().st_size > size
    finally:
        checkpointer.stop()
        setup.close()
    assert checkpointer.thread is not None and not checkpointer.thread.is_alive()


def test_one_process_checkpoints_a_file_and_another_takes_over(tmp_path: Path) -> None:
    """Two checkpointers of one file (as two workers would have): one holds the lock; when it
    stops, the other takes it."""
    file = tmp_path / "ledger.sqlite3"
    sqlite3.connect(file).execute("PRAGMA journal_mode=WAL").close()
    first, second = (WalCheckpointer(file, interval_seconds=0.02) for _ in range(2))
    first.start()
    time.sleep(0.1)
    second.start()
    try:
        time.sleep(0.1)
        assert first.lock_descriptor is not None and second.lock_descriptor is None
        first.stop()
        deadline = time.monotonic() + 5
        while second.lock_descriptor is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert second.lock_descriptor is not None
    finally:
        first.stop()
        second.stop()


def test_the_service_checkpoints_its_sqlite_file_and_nothing_else(harness: Harness) -> None:
    checkpointer = harness.app.database.checkpointer
    if harness.app.database.is_sqlite:
        assert checkpointer is not None and checkpointer.thread is not None
        assert checkpointer.thread.is_alive()
    else:
        assert checkpointer is None
    assert Database("sqlite://").checkpointer is None
    assert Database("postgresql+psycopg://nobody@127.0.0.1:1/none").checkpointer is None
