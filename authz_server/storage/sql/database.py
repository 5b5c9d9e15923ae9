"""Engine, sessions and the worker threads SQL runs on (SQLAlchemy is synchronous here)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from authz_server.domain.errors import Unavailable
from authz_server.observability.thread_names import name_this_thread
from authz_server.storage.sql.dbapi import execute
from authz_server.storage.sql.failures import unavailable
from authz_server.storage.sql.wal_checkpointer import WalCheckpointer
from authz_server.storage.sql.writer_lock import WriterLock, lock_path, sqlite_file

T = TypeVar("T")
# Tries of run_locking, LOCKING_RETRY_SECONDS x the try number apart.
LOCKING_TRIES = 3
LOCKING_RETRY_SECONDS = 0.1


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling breaks SAVEPOINT (group commit needs it): take it
    # over, as SQLAlchemy's SQLite documentation recommends, and BEGIN ourselves (_sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the one writer; the busy timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # 64 MiB of page cache a connection (the default is 2 MiB): the journal's and the
    # captures' indexes take random keys, and once they outgrow the cache every insert reads
    # its leaf pages back from the file.
    cursor.execute("PRAGMA cache_size=-65536")
    # Copy the write-ahead log back into the database every 10,000 pages (~40 MiB) rather than
    # every 1,000: a page the captures change again and again is copied once per checkpoint.
    cursor.execute("PRAGMA wal_autocheckpoint=10000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # IMMEDIATE: take the write lock at the start. A deferred transaction that reads and then
    # writes fails at once ("database is locked") when another process writes meanwhile; an
    # immediate one waits for busy_timeout instead (several workers share one SQLite file).
    # On the driver's cursor (dbapi.execute): SQLAlchemy's statement execution around it was
    # ~40% of a BEGIN's time, and every journal and audit batch begins with one.
    execute(connection, "BEGIN IMMEDIATE")


class Database:
    """Runs units of work in transactions on a bounded thread pool.

    SQLite allows one writer, so it gets one thread (writes queue instead of failing with
    'database is locked'); PostgreSQL gets `threads`, and row locks keep it correct.
    """

    def __init__(self, url: str, threads: int = 8) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        options: dict[str, Any] = {}
        if not self.is_sqlite:
            options = {"pool_size": threads, "max_overflow": 0, "pool_pre_ping": True}
        self.engine: Engine = create_engine(url, **options)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        lock_file = lock_path(url)  # None but for a SQLite file
        self.writer_lock = WriterLock(lock_file) if lock_file else None
        file = sqlite_file(url)
        self.checkpointer = WalCheckpointer(file) if file is not None else None
        self.executor = ThreadPoolExecutor(
            max_workers=1 if self.is_sqlite else threads,
            thread_name_prefix="sql",
            initializer=name_this_thread,
            initargs=("sql",),
        )

    def writing(self) -> AbstractContextManager[object]:
        """Held around every transaction: on a SQLite file, the writer lock its processes share
        (storage/sql/writer_lock.py); elsewhere nothing."""
        return self.writer_lock if self.writer_lock is not None else nullcontext()

    def transaction(self, work: Callable[[Session], T]) -> T:
        """Runs work(session) in one transaction on the calling thread."""
        with self.writing(), self.sessions() as session, session.begin():
            return work(session)

    def core_transaction(self, work: Callable[[Connection], T]) -> T:
        """Runs work(connection) in one transaction on the calling thread, on a Core connection:
        no ORM session is built, flushed and closed around it (~50-65 µs less a transaction, a
        tenth of a small journal batch's cost; loadtest/RESULTS.md)."""
        with self.writing(), self.engine.begin() as connection:
            return work(connection)

    async def run(self, work: Callable[[Session], T]) -> T:
        """Runs work(session) in one transaction on the SQL threads."""
        return await self._on_sql_thread(self.transaction, work)

    async def run_locking(self, work: Callable[[Session], T]) -> T:
        """run(work), tried again (LOCKING_TRIES in all) when it raised Unavailable: it could
        not take its locks (a PostgreSQL deadlock with a transaction outside the service's lock
        order, README "One lock order for quotas": a worker of an earlier version during a
        rolling upgrade, an operator's script), the connection was lost, or a Redis call inside
        it did not answer (a reconcile page). For work that takes many quotas' row locks in id
        order and is safe to run again; the other side of a deadlock is retried by its own
        caller."""
        for attempt in range(1, LOCKING_TRIES):
            try:
                return await self.run(work)
            except Unavailable:
                await asyncio.sleep(LOCKING_RETRY_SECONDS * attempt)
        return await self.run(work)

    async def run_core(self, work: Callable[[Connection], T]) -> T:
        """Runs work(connection) in one transaction on the SQL threads, without an ORM session:
        for the group commits that only insert and read columns (journal, audit trail)."""
        return await self._on_sql_thread(self.core_transaction, work)

    async def _on_sql_thread(self, transaction: Callable[[Callable[[Any], T]], T], work: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, transaction, work)
        except OperationalError as error:
            raise unavailable(error) from error

    def start_checkpoints(self) -> None:
        """A SQLite file's log copied back by a thread of its own (storage/sql/wal_checkpointer.py),
        not by the commit that crosses the threshold; nothing for another database."""
        if self.checkpointer is not None:
            self.checkpointer.start()

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.executor.shutdown(wait=True)
        self.engine.dispose()
        if self.writer_lock is not None:
            self.writer_lock.close()
