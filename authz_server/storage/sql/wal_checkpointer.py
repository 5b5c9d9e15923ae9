"""Copies a SQLite file's write-ahead log back into the database from a thread of its own, so
that no payment's commit does it.

SQLite's automatic checkpoint runs inside the commit that crosses `wal_autocheckpoint` pages
(database.py sets 10,000: ~40 MiB): that commit copies the whole log into the database and
syncs the file, 20-60 ms on this project's machines, and every decision queued behind it in
the journal waits as long: Authorize's p99 at 80% of peak was 121-176 ms, 62-107 ms with this
thread (loadtest/RESULTS.md, 2026-12-05). Here a PASSIVE
checkpoint runs every CHECKPOINT_INTERVAL_SECONDS on a connection of its own: it copies what
the log holds without waiting for, or blocking, the writer or the readers. The automatic
checkpoint stays as the backstop: when it does fire, the log is already copied but for the last
fraction of a second, so it is short, and it is what lets the log start over from its beginning
(a log copied only by another connection while commits go on would never be fully copied at the
moment a writer begins, and would grow).

A checkpoint changes no data and no durability: committed transactions are in the log
(synchronous=NORMAL, as before); a process killed mid-checkpoint leaves a log SQLite replays
on the next open (tests/test_wal_checkpointer.py kills one under load).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from authz_server.observability.thread_names import name_this_thread

log = logging.getLogger(__name__)

# Often enough that the log never holds more than a fraction of a second of commits (a few MiB
# at the benchmark's load), seldom enough that a page the captures change again and again is
# not copied many times a second.
CHECKPOINT_INTERVAL_SECONDS = 0.2
# How long stop() waits for a checkpoint under way to end.
STOP_WAIT_SECONDS = 5.0


class WalCheckpointer:
    def __init__(self, database_file: Path, interval_seconds: float = CHECKPOINT_INTERVAL_SECONDS):
        self.database_file = database_file
        self.interval_seconds = interval_seconds
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.checkpoints = 0  # completed, for tests and tools

    def start(self) -> None:
        if self.thread is not None:
            return
        self.thread = threading.Thread(target=self._run, name="sql-checkpoint", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(STOP_WAIT_SECONDS)

    def _run(self) -> None:
        name_this_thread("sql-checkpoint")
        connection: sqlite3.Connection | None = None
        try:
            while not self.stopping.wait(self.interval_seconds):
                try:
                    if connection is None:
                        connection = sqlite3.connect(self.database_file, isolation_level=None)
                    # (busy, frames in the log, frames copied); PASSIVE never waits for locks
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as error:  # the file went away, a disk error: try again
                    log.debug("WAL checkpoint of %s failed: %r", self.database_file, error)
                    if connection is not None:
                        connection.close()
                        connection = None
        finally:
            if connection is not None:
                connection.close()
