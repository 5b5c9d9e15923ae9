"""One writer at a time on a SQLite file shared by several server processes, handed over at once.

SQLite lets one connection write at a time; a second BEGIN IMMEDIATE waits in SQLite's busy
handler, which sleeps between tries (1, 2, 5, 10, ... up to 100 ms) rather than waking when the
lock is free. With two workers on one file, captures queued behind those sleeps (Capture p99
~390 ms against ~100 ms with one worker). Here every write transaction first takes an exclusive
OS lock on a file beside the database (flock, blocking, the GIL released while it waits): the
next writer wakes the moment the holder commits, and SQLite's own lock is then always free.
SQLite's busy handler still guards against writers that do not take this lock (the bulk loader,
migrations, a sqlite3 shell).

Within a process a threading lock comes first: flock locks belong to an open file, and one
process holds one open file, so its own threads are ordered by the threading lock.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # Windows: SQLite's busy handler alone orders the writers
    fcntl = None  # type: ignore[assignment]


class WriterLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._threads = threading.Lock()
        self._descriptor: int | None = None
        self._opened_by = 0

    def __enter__(self) -> WriterLock:
        self._threads.acquire()
        try:
            if fcntl is not None:
                fcntl.flock(self._file(), fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if fcntl is not None and self._descriptor is not None:
                fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _file(self) -> int:
        # Opened lazily and again in a forked child (whose inherited descriptor would share
        # its parent's lock: flock locks belong to the open file, not the process).
        if self._descriptor is None or self._opened_by != os.getpid():
            self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._opened_by = os.getpid()
        return self._descriptor

    def close(self) -> None:
        if self._descriptor is not None and self._opened_by == os.getpid():
            os.close(self._descriptor)
        self._descriptor = None


def sqlite_file(database_url: str) -> Path | None:
    """The file of a SQLite database URL; None for an in-memory database or another database."""
    prefix = "sqlite:///"
    if not database_url.startswith(prefix):
        return None
    file = database_url[len(prefix) :].split("?", 1)[0]
    if not file or file == ":memory:":
        return None
    return Path(file)


def lock_path(database_url: str) -> Path | None:
    """Where the writer lock of a SQLite file lives (beside it); None for an in-memory
    database or another database."""
    file = sqlite_file(database_url)
    return None if file is None else Path(f"{file}.writer-lock")
