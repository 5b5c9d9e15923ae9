"""Group commit: concurrent refunds share one SQL transaction (captures have their own
set-based batches: service/capture_writer.py).

Each unit of work runs in its own SAVEPOINT, so a refusal (a relationship no longer active, a
refund over the captured amount) undoes only that unit; one COMMIT then makes the whole batch
durable. While one batch commits, the next one gathers, so SQL latency does not cap throughput.

A batch's units come in any order, so the row locks they take one after another have no order
across them. A group commit may be given a `lock_first` step: called once a batch, with the
lock keys its units were submitted with, before any unit runs, it takes the rows the units will
lock in the order every other writer takes them. It runs outside the units' savepoints, so a
refused unit's rollback does not let those locks go; a unit locking such a row again finds it
held already.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from opentelemetry.trace import SpanContext
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from authz_server.observability import tracing
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.failures import unavailable

T = TypeVar("T")
# Bounds one transaction: long enough to amortize a commit, short enough for lock times.
MAX_BATCH = 256

BatchObserver = Callable[[int, float], None]
# (session, the batch's lock keys in submission order): takes the units' row locks up front.
LockFirst = Callable[[Session, list[str]], None]


def _ignore(_size: int, _seconds: float) -> None:
    return None


def answer(futures: list[asyncio.Future[Any]], outcomes: list[tuple[bool, Any]]) -> None:
    """Gives each waiting caller of a batch its outcome: (True, result) or (False, error).
    A caller that stopped waiting (cancelled) is skipped."""
    for future, (ok, value) in zip(futures, outcomes, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class GroupCommit:
    def __init__(
        self,
        database: Database,
        observe: BatchObserver = _ignore,
        lock_first: LockFirst | None = None,
    ) -> None:
        self.database = database
        self.observe = observe
        self.lock_first = lock_first
        self.pending: list[tuple[Callable[[Session], Any], asyncio.Future[Any]]] = []
        # The traced callers' spans, by their futures: the batch span links to them.
        self.callers: dict[asyncio.Future[Any], SpanContext] = {}
        # The units' lock keys (for lock_first), by their futures, as the callers' spans.
        self.lock_keys: dict[asyncio.Future[Any], str] = {}
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def submit(self, work: Callable[[Session], T], lock_key: str | None = None) -> T:
        """Runs work(session) in the next batch; raises what work raised, or Unavailable.
        lock_key: what the batch's lock_first step takes for this unit before the units run."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.pending.append((work, future))
        if lock_key is not None:
            self.lock_keys[future] = lock_key
        tracing.remember_caller(self.callers, future)
        self.wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                started = time.perf_counter()
                callers = tracing.callers_of(self.callers, [future for _, future in batch])
                keys = [
                    key
                    for _, future in batch
                    if (key := self.lock_keys.pop(future, None)) is not None
                ]
                try:
                    with tracing.batch_span("sql refund batch", callers, len(batch)):
                        outcomes = await loop.run_in_executor(
                            self.database.executor,
                            self._commit,
                            [work for work, _ in batch],
                            keys,
                        )
                except OperationalError as error:
                    failure = unavailable(error)
                    outcomes = [(False, failure)] * len(batch)
                except Exception as error:  # the COMMIT itself failed: nothing of it happened
                    outcomes = [(False, error)] * len(batch)
                self.observe(len(batch), time.perf_counter() - started)
                answer([future for _, future in batch], outcomes)

    def _commit(
        self, works: list[Callable[[Session], Any]], keys: list[str]
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        with self.database.writing(), self.database.sessions() as session, session.begin():
            if self.lock_first is not None and keys:
                # Outside the savepoints: a failure here (a lost connection) fails the batch,
                # answered Unavailable by _run, as its COMMIT's.
                self.lock_first(session, keys)
            for work in works:
                try:
                    with session.begin_nested():
                        answer = work(session)
                    # Only once the savepoint is released: its release flushes what the unit
                    # left unflushed and may fail (a unique key), and then the unit failed.
                    outcomes.append((True, answer))
                except OperationalError as error:  # a lock or connection failure: retryable
                    if error.connection_invalidated:
                        # The connection, and the batch's transaction with it, is gone: the
                        # next unit and the COMMIT would fail with PendingRollbackError
                        # (INTERNAL). The whole batch fails, answered and counted once by _run.
                        raise
                    outcomes.append((False, unavailable(error)))
                except Exception as error:  # this unit only; its savepoint was rolled back
                    outcomes.append((False, error))
        return outcomes
