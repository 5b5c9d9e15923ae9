"""Copies a SQLite file's write-ahead log back into the database from a thread of its own, so
that no payment's commit does it.

SQLite's automatic checkpoint runs inside the commit that crosses `wal_autocheckpoint` pages
(database.py sets 10,000: ~40 MiB): that commit copies the whole log into the database and
syncs the file, 20-60 ms on this project's machines, and every decision queued behind it in
the journal waits as long: Authorize's p99 at 80% of peak was 121-176 ms, 62-107 ms with this
thread (loadtest/RESULTS.md, 2026-12-05). Here a PASSIVE checkpoint runs every
CHECKPOINT_INTERVAL_SECONDS on a connection of its own: it copies what the log holds without
waiting for, or blocking, the writer or the readers. The automatic checkpoint stays as the
backstop: when it does fire, the log is already copied but for the last fraction of a second,
so it is short, and it is what lets the log start over from its beginning (a log copied only
by another connection while commits go on is never wholly copied at the moment a writer
begins, and would grow).

One process per file checkpoints: the one that holds `<file>.checkpoint-lock` (flock, taken
without waiting and tried again every interval, so another worker takes over when it exits).
Every outcome is counted (medwallet_sqlite_checkpoints_total{result}); a failure is logged as a
WARNING once, and so is the recovery.

A checkpoint changes no data and no durability: committed transactions are in the log
(synchronous=NORMAL, as before); a process killed mid-checkpoint leaves a log SQLite replays
on the next open (tests/test_wal_checkpointer.py kills one while the thread copies).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from pathlib import Path

from authz_server.observability import metrics
from authz_server.observability.thread_names import name_this_thread

try:
    import fcntl
except ImportError:  # Windows: every process checkpoints (harmless: PASSIVE ones queue)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Often enough that the log never holds more than a fraction of a second of commits (a few MiB
# at the benchmark's load), seldom enough that a page the captures change again and again is
# not copied many times a second (0.5 s measured the same; 1 s let the tail grow again).
CHECKPOINT_INTERVAL_SECONDS = 0.2
# How long stop() waits for the thread once it has interrupted a checkpoint under way.
STOP_WAIT_SECONDS = 2.0
# Beside the database: held by the one process that checkpoints it.
CHECKPOINT_LOCK_SUFFIX = ".checkpoint-lock"


class WalCheckpointer:
    def __init__(
        self, database_file: Path, interval_seconds: float = CHECKPOINT_INTERVAL_SECONDS
    ) -> None:
        self.database_file = database_file
        self.interval_seconds = interval_seconds
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.connection: sqlite3.Connection | None = None
        self.lock_descriptor: int | None = None
        self.failing = False
        self.counted = {
            result: metrics.sqlite_checkpoints.labels(result)
            for result in ("copied", "busy", "not_wal", "failed")
        }

    def start(self) -> None:
        if self.thread is not None:
            return
        self.thread = threading.Thread(target=self._run, name="sql-checkpoint", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Ends the thread; a checkpoint under way is interrupted (it is copied again later)."""
        self.stopping.set()
        connection = self.connection
        if connection is not None:
            with contextlib.suppress(sqlite3.Error):
                connection.interrupt()
        if self.thread is not None:
            self.thread.join(STOP_WAIT_SECONDS)

    def _run(self) -> None:
        name_this_thread("sql-checkpoint")
        try:
            while not self.stopping.wait(self.interval_seconds):
                if not self._holds_the_lock():
                    continue
                self._checkpoint_once()
        finally:
            if self.connection is not None:
                self.connection.close()
                self.connection = None
            if self.lock_descriptor is not None:
                os.close(self.lock_descriptor)  # releases the flock
                self.lock_descriptor = None

    def _holds_the_lock(self) -> bool:
        if fcntl is None or self.lock_descriptor is not None:
            return True
        path = f"{self.database_file}{CHECKPOINT_LOCK_SUFFIX}"
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process checkpoints this file
            os.close(descriptor)
            return False
        self.lock_descriptor = descriptor
        return True

    def _checkpoint_once(self) -> None:
        try:
            if self.connection is None:
                connection = sqlite3.connect(self.database_file, isolation_level=None)
                # A read first: a connection learns that the file is in WAL mode only when it
                # reads (one opened before the switch would otherwise answer -1 forever).
                connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
                self.connection = connection
            # (busy, frames in the log, frames copied); PASSIVE never waits for a lock
            busy, frames, _ = self.connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except Exception as error:  # a disk error, the file gone, an interrupt at stop
            if self.stopping.is_set():
                return
            self.counted["failed"].inc()
            if not self.failing:
                log.warning(
                    "SQLite checkpoints of %s fail (commits do them instead): %r",
                    self.database_file,
                    error,
                )
                self.failing = True
            self._reconnect()
            return
        if frames == -1:  # not (yet) in WAL mode: look again with a new connection
            self.counted["not_wal"].inc()
            self._reconnect()
            return
        self.counted["busy" if busy else "copied"].inc()
        if self.failing:
            log.warning("SQLite checkpoints of %s work again", self.database_file)
            self.failing = False

    def _reconnect(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
