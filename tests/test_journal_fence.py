"""The journal's fence against a rebuild (storage/sql/journal_fence.py) on the harness's
database: a rebuild's wait_for_journal returns only once a journal transaction that took the
fence has ended. On PostgreSQL the fence is an advisory lock taken on the driver's cursor; on
SQLite the database's write lock (tests/test_writer_lock.py checks it without the writer lock)."""

from __future__ import annotations

import threading

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
