"""Server processes sharing one SQLite file take turns through the writer lock, so SQLite itself
never sees two writers: with SQLite's busy timeout set to 0 (a second writer fails at once with
'database is locked'), two processes writing as fast as they can lose no transaction. Without
the lock the same run fails (test_without_the_lock_sqlite_refuses_the_second_writer)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from authz_server.storage.sql.database import Database
from authz_server.storage.sql.writer_lock import WriterLock, lock_path

TRANSACTIONS = 300


def _no_busy_wait(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA busy_timeout=0")


def _writer(url: str, use_lock: bool, start: Any, errors: Any) -> None:
    database = Database(url)
    event.listen(database.engine, "connect", _no_busy_wait)
    if not use_lock:
        database.writer_lock = None
    start.wait()  # both writers ready: they start together
    failed = 0
    for _ in range(TRANSACTIONS):
        try:
            database.transaction(
                lambda session: session.execute(text("UPDATE counter SET n = n + 1"))
            )
        except Exception:
            failed += 1
    errors.put(failed)
    database.close()


def _run_two_writers(directory: Path, use_lock: bool) -> tuple[int, int]:
    url = f"sqlite:///{directory / 'shared.sqlite3'}"
    setup = Database(url)
    setup.transaction(lambda session: session.execute(text("CREATE TABLE counter (n INTEGER)")))
    setup.transaction(lambda session: session.execute(text("INSERT INTO counter VALUES (0)")))
    context = multiprocessing.get_context("spawn")  # as the server spawns its workers
    start = context.Barrier(2)
    errors = context.Queue()
    writers = [
        context.Process(target=_writer, args=(url, use_lock, start, errors)) for _ in range(2)
    ]
    for writer in writers:
        writer.start()
    failed = errors.get(timeout=120) + errors.get(timeout=120)
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0
    total = setup.transaction(
        lambda session: int(session.execute(text("SELECT n FROM counter")).scalar_one())
    )
    setup.close()
    return total, failed


def test_two_processes_take_turns_and_lose_nothing(tmp_path: Path) -> None:
    total, failed = _run_two_writers(tmp_path, use_lock=True)
    assert failed == 0
    assert total == 2 * TRANSACTIONS


def test_without_the_lock_sqlite_refuses_the_second_writer(tmp_path: Path) -> None:
    """What the lock prevents: the same two writers collide inside SQLite."""
    total, failed = _run_two_writers(tmp_path, use_lock=False)
    assert failed > 0
    assert total == 2 * TRANSACTIONS - failed


def test_the_lock_is_beside_the_database_file() -> None:
    assert lock_path("sqlite:////var/lib/mw/ledger.sqlite3") == Path(
        "/var/lib/mw/ledger.sqlite3.writer-lock"
    )
    assert lock_path("sqlite:///data/medwallet.sqlite3?timeout=5") == Path(
        "data/medwallet.sqlite3.writer-lock"
    )
    assert lock_path("sqlite://") is None
    assert lock_path("sqlite:///:memory:") is None
    assert lock_path("postgresql+psycopg://u@h/db") is None


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path / "x.writer-lock")
    inside = 0
    most = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(200):
            with lock:
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.0002)  # long enough for the others to try to come in
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    lock.close()
    assert most == 1


def test_a_begin_refused_by_sqlite_is_unavailable(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE runs on the driver's cursor (database._sqlite_begin): SQLite's 'database is
    locked' still reaches the caller as SQLAlchemy's OperationalError, which run_core answers
    Unavailable (the till retries), and the next transaction goes through."""
    import asyncio
    import sqlite3

    import pytest
    from sqlalchemy.exc import OperationalError

    from authz_server.domain.errors import Unavailable

    url = f"sqlite:///{tmp_path / 'locked.db'}"
    database = Database(url)
    event.listen(database.engine, "connect", _no_busy_wait)
    database.writer_lock = None  # another program holds SQLite's own lock, not the service's
    database.transaction(lambda session: session.execute(text("CREATE TABLE t (n INTEGER)")))
    other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(OperationalError, match="locked"):
            database.core_transaction(lambda connection: None)
        with pytest.raises(Unavailable, match="locked"):
            asyncio.run(database.run_core(lambda connection: None))
    finally:
        other.execute("ROLLBACK")
        other.close()
    database.core_transaction(
        lambda connection: connection.execute(text("INSERT INTO t VALUES (1)"))
    )
    database.close()


def test_the_rebuilds_fence_waits_for_a_journal_write_on_sqlite(tmp_path: Path) -> None:
    """wait_for_journal (storage/sql/journal_fence.py) returns only once a write transaction in
    progress has ended, from SQLite's own lock alone (the writer lock left out): a rebuild
    that read SQL before a journal row committed would not put its hold back."""
    import sqlite3

    from authz_server.storage.sql.journal_fence import wait_for_journal

    url = f"sqlite:///{tmp_path / 'fence.db'}"
    database = Database(url)
    database.writer_lock = None
    database.transaction(lambda session: session.execute(text("CREATE TABLE t (n INTEGER)")))
    journal = sqlite3.connect(tmp_path / "fence.db", isolation_level=None)
    journal.execute("BEGIN IMMEDIATE")
    journal.execute("INSERT INTO t VALUES (1)")
    returned = threading.Event()
    fence = threading.Thread(
        target=lambda: (database.transaction(wait_for_journal), returned.set())
    )
    fence.start()
    try:
        assert not returned.wait(0.5), "the fence passed a write transaction still in progress"
    finally:
        journal.execute("COMMIT")
        journal.close()
    assert returned.wait(10)
    fence.join()
    database.close()
