"""The fences of storage/sql/journal_fence.py and settlement_lock.py, on the harness's database:
a rebuild's wait_for_journal returns only once a journal transaction that took the fence has
ended, a month's close (wait_for_writers) only once a capture batch or a refund that took the
writers' lock has. On PostgreSQL these are advisory locks (the journal's and a capture batch's
taken on the driver's cursor); on SQLite the database's write lock (tests/test_writer_lock.py
checks it without the writer lock)."""

from __future__ import annotations

import contextlib
import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import Connection

from authz_server.storage.sql.journal_fence import for_journaling, wait_for_journal
from tests.harness import Harness


def test_a_rebuild_waits_for_a_journal_transaction_that_took_the_fence(harness: Harness) -> None:
    database = harness.app.database
    fenced = threading.Event()
    release = threading.Event()

    def journal(connection: Connection) -> None:
        for_journaling(connection)
        fenced.set()
        assert release.wait(10)

    journaling = threading.Thread(target=lambda: database.core_transaction(journal))
    journaling.start()
    assert fenced.wait(10)
    returned = threading.Event()
    rebuild = threading.Thread(
        target=lambda: (database.transaction(wait_for_journal), returned.set())
    )
    rebuild.start()
    try:
        assert not returned.wait(0.5), "the fence let a rebuild pass a journal transaction"
    finally:
        release.set()
        journaling.join(10)
    assert returned.wait(10)
    rebuild.join(10)


@pytest.mark.parametrize("writer", ["capture batch", "refund"])
def test_a_months_close_waits_for_a_write_that_took_the_writers_lock(
    harness: Harness, writer: str
) -> None:
    """settlement_lock: a capture batch (a Core connection) or a refund (an ORM session) takes
    the writers' lock; a close's wait_for_writers returns only once it has committed."""
    from authz_server.storage.sql.settlement_lock import for_writing, wait_for_writers

    database = harness.app.database
    holding = threading.Event()
    release = threading.Event()

    def write(connection: Any) -> None:
        for_writing(connection)
        holding.set()
        assert release.wait(10)

    writing = threading.Thread(
        target=lambda: (
            database.core_transaction(write)
            if writer == "capture batch"
            else database.transaction(write)
        )
    )
    writing.start()
    assert holding.wait(10)
    returned = threading.Event()
    close = threading.Thread(
        target=lambda: (database.transaction(wait_for_writers), returned.set())
    )
    close.start()
    try:
        # On SQLite wait_for_writers takes nothing (settlement_lock.py): SQLite's write lock and
        # the writer lock order a close's own transaction after every write.
        if not database.is_sqlite:
            assert not returned.wait(0.5), "the close passed a write in progress"
    finally:
        release.set()
        writing.join(10)
    assert returned.wait(10)
    close.join(10)


def test_a_months_close_waits_for_a_real_capture_batch(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through CaptureWriter itself: a batch paused after it took the writers' lock
    (in its ledger read) holds a close back until it ends (fails if _decide_and_write no
    longer takes the lock first)."""
    from authz_server.service.capture_writer import CaptureWriter
    from authz_server.storage.sql import capture_batch
    from authz_server.storage.sql.settlement_lock import wait_for_writers

    database = harness.app.database
    if database.is_sqlite:
        pytest.skip("on SQLite the write lock orders every transaction (the test above)")
    paused = threading.Event()
    release = threading.Event()

    def load(*_: Any, **__: Any) -> Any:
        paused.set()
        assert release.wait(10)
        raise RuntimeError("the batch ends here")  # rolled back

    monkeypatch.setattr(capture_batch, "load", load)
    writer = CaptureWriter(database)

    def batch() -> None:
        with contextlib.suppress(RuntimeError):
            database.core_transaction(lambda connection: writer._decide_and_write([], connection))

    batching = threading.Thread(target=batch)
    batching.start()
    assert paused.wait(10)
    returned = threading.Event()
    close = threading.Thread(
        target=lambda: (database.transaction(wait_for_writers), returned.set())
    )
    close.start()
    try:
        assert not returned.wait(0.5), "the close passed a capture batch in progress"
    finally:
        release.set()
        batching.join(10)
    assert returned.wait(10)
    close.join(10)


def test_the_locks_are_the_schemas_own(harness: Harness) -> None:
    """storage/sql/advisory_locks.py: a writer of another schema of the same database (another
    deployment, another test session) takes the writers' lock while this schema's close holds
    it; one of this schema waits (here: gives up at its lock_timeout)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from authz_server.storage.sql.advisory_locks import WRITERS_LOCK, exclusive, shared

    database = harness.app.database
    if database.is_sqlite:
        pytest.skip("PostgreSQL's advisory locks (SQLite: one database file a deployment)")
    engine = create_engine(database.url)
    other = f"other_{uuid.uuid4().hex[:12]}"
    try:
        with engine.connect() as closing, engine.connect() as writing:
            closing.execute(text(exclusive(WRITERS_LOCK)))  # this schema's close holds it
            writing.execute(text(f"CREATE SCHEMA {other}"))
            writing.execute(text(f"SET LOCAL search_path TO {other}"))
            writing.execute(text("SET LOCAL lock_timeout = '5s'"))
            writing.execute(text(shared(WRITERS_LOCK)))  # another schema's: taken at once
            writing.rollback()
            writing.execute(text("SET LOCAL lock_timeout = '200ms'"))
            with pytest.raises(OperationalError, match="lock timeout"):
                writing.execute(text(shared(WRITERS_LOCK)))  # this schema's: waits
            closing.rollback()
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {other}"))
        engine.dispose()
