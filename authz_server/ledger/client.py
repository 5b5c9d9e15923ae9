"""A worker's side of its ledger writer (writer.py): starts the process, sends it the journal's
rows and the audit trail's records, and restarts it when it is gone.

`RemoteJournal.write` is Journal.write's contract: returns once the row is committed (None, or
the decision SQL holds for the key), raises Unavailable when it is not known to be. Rows of all
the calls of one event-loop turn go as one frame. A writer that dies, or a connection that
drops, fails its rows in flight with Unavailable (some may have committed: the till's retry
finds them, as after a SQL connection lost in a commit); the next write starts it again.
`RemoteAudit.record` sends records on (fire and forget), keeping up to the audit trail's own
bound while the writer is away or not reading. Records a writer holds when it crashes are lost
(as a worker's own are when it crashes; a clean stop writes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authz_server.domain.errors import Unavailable
from authz_server.ledger.forwarded_metrics import WorkerMetrics
from authz_server.ledger.protocol import (
    DATABASE_URL_VARIABLE,
    MAX_ROWS_PER_FRAME,
    REDIS_URL_VARIABLE,
    audit_frames,
    frame,
    read_frame,
)
from authz_server.observability import metrics
from authz_server.service.audit_trail import AuditRecord, buffer_within_bound
from authz_server.service.journal import MAX_QUEUED, Written, settle

log = logging.getLogger(__name__)

# How long a write waits for the writer to (re)start before it is answered UNAVAILABLE.
START_SECONDS = 15.0
# A writer not listening this long after it was started is taken for hung at its start (stopped,
# or stuck before its socket): killed, and another started. Above a start's worst seen on a
# loaded machine (a few seconds at load 15 on 2 cores), so that a slow start is waited for, not
# killed again and again; and with START_SECONDS well within the late journal's RETRY_SECONDS
# (60 s), so that the rows waiting meanwhile are written by its successor, not given up.
START_HUNG_SECONDS = 20.0
# How long a stop waits for the writer to write what it holds and exit before it is killed.
STOP_SECONDS = 10.0
# A journal frame unanswered this long: the writer is taken for hung, killed and started again
# (its rows fail UNAVAILABLE). Far above a commit's worst seen (~0.1 s).
FRAME_DEADLINE_SECONDS = 30.0
# Audit records wait in the client's bounded buffer while this much is unsent on the socket
# (a writer alive but not reading must not grow the worker's memory without end).
MAX_UNSENT_BYTES = 16 * 1024 * 1024


# A unix socket's path is at most 107 bytes on Linux.
MAX_SOCKET_PATH_BYTES = 100
PRIVATE_DIRECTORY_PREFIX = "medwallet-ledger-"


def socket_path(data_dir: Path) -> Path:
    """Where a worker's writer listens: in the data directory, or, when that path would be
    too long for a unix socket, in a private temporary directory (mode 0700)."""
    path = data_dir / f"ledger-{os.getpid()}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
        return path
    return Path(tempfile.mkdtemp(prefix=PRIVATE_DIRECTORY_PREFIX)) / "writer.sock"


@dataclass(frozen=True)
class WriterCommand:
    """What the writer process is started with (the worker's own settings)."""

    socket: Path
    database_url: str
    redis_url: str
    redis_timeout_seconds: float
    log_level: str
    event_loop: str

    def arguments(self) -> list[str]:
        """The command line: no URL (they may hold credentials, and any local user can read a
        process's arguments): those go in its environment (`environment`)."""
        return [
            sys.executable, "-m", "authz_server.ledger.writer",
            "--socket", str(self.socket),
            "--redis-timeout-seconds", str(self.redis_timeout_seconds),
            "--log-level", self.log_level, "--event-loop", self.event_loop,
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return {DATABASE_URL_VARIABLE: self.database_url, REDIS_URL_VARIABLE: self.redis_url}


class LedgerClient:
    def __init__(self, command: WriterCommand) -> None:
        self.command = command
        self.process: asyncio.subprocess.Process | None = None
        self.stream: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.batch_ids = itertools.count(1)
        # batch id -> the futures of its rows, in order
        self.in_flight: dict[int, list[asyncio.Future[Written]]] = {}
        # batch id -> the future of an audit flush (RemoteAudit.flush)
        self.audit_flushes: dict[int, asyncio.Future[Any]] = {}
        # audit flushes whose caller stopped waiting: their answers, when they come, are dropped
        self.abandoned_audit_flushes: set[int] = set()
        self.rows: list[dict[str, Any]] = []
        self.futures: list[asyncio.Future[Written]] = []
        self.records: deque[AuditRecord] = deque()
        self.flush_scheduled = False
        self.waiting_for_writer = False
        self.frame_timer: asyncio.TimerHandle | None = None
        # The worker's event loop (set by the first write or start): records may be handed in
        # from another thread, and their flush is then scheduled onto it.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # referenced until done
        self.killed = False  # the writer was killed here and may not be reaped yet
        self.started_at = 0.0  # when the writer was started (time.monotonic)
        self.metrics = WorkerMetrics()  # the writer's, added to this worker's series
        self.closed = False
        self.journal = RemoteJournal(self)
        self.audit = RemoteAudit(self)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- the process and its connection -----------------------------------------------------

    async def ready(self) -> asyncio.StreamWriter:
        """The connection to a running writer, started (again) if need be."""
        if self.stream is not None and not self.stream.is_closing():
            return self.stream
        if self.reader_task is not None and not self.reader_task.done():
            # A connection ending: its reader fails its rows in flight (_lost) before another
            # connection is made, so every row in flight belongs to the connection there is.
            if self.stream is not None:
                self.stream.close()
            await asyncio.gather(self.reader_task, return_exceptions=True)
        if self.closed:
            raise Unavailable("the ledger writer is stopped")
        if self.connecting is None or self.connecting.done():
            self.connecting = asyncio.get_running_loop().create_task(self._connect())
        try:
            await asyncio.wait_for(asyncio.shield(self.connecting), START_SECONDS)
        except Exception as error:
            raise Unavailable(f"the ledger writer is not answering: {error!r}") from error
        assert self.stream is not None
        return self.stream

    async def _start_process(self) -> asyncio.subprocess.Process:
        if self.process is not None:
            log.warning("ledger writer exited (%s): starting it again", self.process.returncode)
        with contextlib.suppress(FileNotFoundError):
            self.command.socket.unlink()
        # Its own session: a Ctrl-C or a unit's stop signal goes to the workers, which stop
        # their writers once their calls are done. Its metrics are not written to the workers'
        # multiprocess files (each update through a memory-mapped file): it sends them to its
        # worker (forwarded_metrics.py).
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(self.command.environment())
        return await asyncio.create_subprocess_exec(
            *self.command.arguments(), env=env, start_new_session=True
        )

    async def _connect(self) -> None:
        if self.killed and self.process is not None:  # not its dying socket: its successor's
            await asyncio.wait_for(self.process.wait(), START_SECONDS)
            self.killed = False
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process is None or self.process.returncode is not None:
                self.process = await self._start_process()
                self.started_at = time.monotonic()
            try:
                reader, stream = await asyncio.open_unix_connection(str(self.command.socket))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    if time.monotonic() - self.started_at > START_HUNG_SECONDS:
                        # Hung at its start: killed, as a writer that answers no frame is, so
                        # that a write after this starts another rather than wait on it for ever.
                        self._kill()
                    raise
                # (a writer killed a moment ago is started again once it is reaped, above)
                await asyncio.sleep(0.02)
        self.stream = stream
        self.reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: BaseException = Unavailable("the ledger writer's connection was lost")
        try:
            while True:
                batch_id, outcomes = await read_frame(reader)
                if batch_id == "metrics":
                    self._add_metrics(outcomes)
                    continue
                audit_flush = self.audit_flushes.pop(batch_id, None)
                if audit_flush is not None:
                    settle(audit_flush, outcomes[0])
                    continue
                if batch_id in self.abandoned_audit_flushes:
                    self.abandoned_audit_flushes.discard(batch_id)
                    continue
                futures = self.in_flight.pop(batch_id, None)
                self._stop_frame_timer()
                if futures is None:  # never: the writer answers what it was sent
                    raise ConnectionError(f"an answer to batch {batch_id}, never sent")
                for future, outcome in zip(futures, outcomes, strict=True):
                    settle(future, outcome)
                if self.rows:
                    self._schedule_flush()
        except asyncio.CancelledError:
            raise
        except Exception as lost:  # the end of the stream, or a frame that does not parse
            error = Unavailable(f"the ledger writer's connection was lost: {lost!r}")
        finally:
            self._lost(error)

    def _add_metrics(self, changes: Any) -> None:
        """The writer's metrics, added here; never a reason to drop the connection."""
        try:
            self.metrics.add(changes)
        except Exception:
            log.exception("ledger writer's metrics not counted")

    def _lost(self, error: BaseException) -> None:
        """The connection's end (only its reader calls this, and close()): every row in flight
        on it fails, its commit not known."""
        if self.stream is not None:
            self.stream.close()
        self.stream = None
        self._stop_frame_timer()
        in_flight, self.in_flight = self.in_flight, {}
        audit_flushes, self.audit_flushes = self.audit_flushes, {}
        self.abandoned_audit_flushes.clear()  # never answered on another connection
        for futures in [*in_flight.values(), list(audit_flushes.values())]:
            for future in futures:
                settle(future, error)
        if self.rows:  # queued behind the frame lost: sent on the next connection, or failed
            self._schedule_flush()

    def _stop_frame_timer(self) -> None:
        if self.frame_timer is not None:
            self.frame_timer.cancel()
            self.frame_timer = None

    def _frame_overdue(self) -> None:
        """No answer within FRAME_DEADLINE_SECONDS: the writer is hung. Killed; its reader then
        fails the frame's rows and the next write starts another."""
        self.frame_timer = None
        log.error("ledger writer answered no frame in %s s: killed", FRAME_DEADLINE_SECONDS)
        self._kill()
        if self.stream is not None:
            self.stream.close()

    def _kill(self) -> None:
        """Kills the writer (the next connection waits until it is reaped, then starts another)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            self.killed = True

    # --- sending ----------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self.flush_scheduled:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # another thread (a tool, a test): onto the worker's loop
            running = None
        loop = self.loop = self.loop or running
        if loop is None:
            return  # not started: sent with the first write
        self.flush_scheduled = True
        if running is loop:
            loop.call_soon(self._flush)
        else:
            loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.stream is None or self.stream.is_closing():
            if not self.waiting_for_writer:
                self.waiting_for_writer = True
                self.spawn(self._flush_when_ready())
            return
        # One journal frame in flight, as the journal keeps one batch in its transaction: the
        # rows of the calls that come meanwhile go together when its answer is back (one frame
        # per loop turn was ~1 row a frame, and cost the worker what the writer saved it).
        if self.rows and not self.in_flight:
            rows, self.rows = self.rows[:MAX_ROWS_PER_FRAME], self.rows[MAX_ROWS_PER_FRAME:]
            futures = self.futures[: len(rows)]
            del self.futures[: len(rows)]
            batch_id = next(self.batch_ids)
            self.in_flight[batch_id] = futures
            self.stream.write(frame(("journal", batch_id, rows)))
            self.frame_timer = asyncio.get_running_loop().call_later(
                FRAME_DEADLINE_SECONDS, self._frame_overdue
            )
        unsent = self.stream.transport.get_write_buffer_size()
        if self.records and unsent < MAX_UNSENT_BYTES:
            records = list(self.records)
            self.records.clear()
            self.stream.write(audit_frames(records))

    async def _flush_when_ready(self) -> None:
        try:
            await self.ready()
        except Unavailable as error:
            # the rows fail (the till retries); audit records stay, within their bound
            self.rows = []
            futures, self.futures = self.futures, []
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            return
        finally:
            self.waiting_for_writer = False
        self._schedule_flush()

    async def close(self) -> None:
        """Sends what is left, then stops the writer (it writes what it holds, then exits)."""
        if self.rows or self.records:
            with contextlib.suppress(Unavailable):
                await self.ready()
                self._flush()
        self.closed = True
        if self.stream is not None:
            with contextlib.suppress(Exception):
                await self.stream.drain()
        process = self.process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_SECONDS)
            except TimeoutError:
                log.error("ledger writer did not stop within %s s: killed", STOP_SECONDS)
                process.kill()
                await process.wait()
            finally:
                # The stop cancelled within its bound (Application.stop's step, shorter than
                # STOP_SECONDS): a writer not gone by then is killed, not left running with its
                # worker gone (a stalled one would hold its SQL locks for ever).
                if process.returncode is None:
                    log.error("ledger writer not stopped when its stop was given up: killed")
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
        if self.reader_task is not None:
            self.reader_task.cancel()
            await asyncio.gather(self.reader_task, return_exceptions=True)
        stopped = Unavailable("the ledger writer is stopped")
        self._lost(stopped)
        self.rows = []
        futures, self.futures = self.futures, []
        for future in futures:
            if not future.done():
                future.set_exception(stopped)
        with contextlib.suppress(FileNotFoundError):
            self.command.socket.unlink()
        if self.command.socket.parent.name.startswith(PRIVATE_DIRECTORY_PREFIX):
            with contextlib.suppress(OSError):
                self.command.socket.parent.rmdir()


class RemoteJournal:
    """Journal's contract (service/journal.py), written by the ledger writer."""

    def __init__(self, client: LedgerClient) -> None:
        self.client = client
        self.waited = metrics.journal_wait_seconds.observe

    def start(self) -> None:
        self.client.loop = asyncio.get_running_loop()
        self.client.spawn(self._start())

    async def _start(self) -> None:
        with contextlib.suppress(Unavailable):  # the first write tries again
            await self.client.ready()

    async def write(self, row: dict[str, Any]) -> Written:
        client = self.client
        if len(client.rows) + sum(map(len, client.in_flight.values())) >= MAX_QUEUED:
            metrics.journal_rejected.inc()
            raise Unavailable("the decision journal is too far behind; retry")
        response = row.get("response")
        if response is not None and not isinstance(response, bytes):
            row = {**row, "response": response.SerializeToString()}
        future: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
        client.rows.append(row)
        client.futures.append(future)
        client._schedule_flush()
        queued = time.perf_counter()
        try:
            return await future
        finally:
            self.waited(time.perf_counter() - queued)

    async def flush(self) -> None:
        """Returns once every row handed in so far is answered (written, or failed)."""
        futures = [f for batch in self.client.in_flight.values() for f in batch]
        futures += self.client.futures
        if futures:
            await asyncio.wait(futures)

    async def stop(self) -> None:
        """Waits (bounded) for the rows in flight."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), STOP_SECONDS)


class RemoteAudit:
    """AuditTrail's `record` (service/audit_trail.py), written by the ledger writer."""

    def __init__(self, client: LedgerClient) -> None:
        self.client = client

    def start(self) -> None:
        pass  # the journal starts the writer

    def record(self, records: list[AuditRecord]) -> None:
        buffer_within_bound(self.client.records, records, "ledger writer away?")
        self.client._schedule_flush()

    async def flush(self) -> int:
        """AuditTrail.flush's contract: returns once the records recorded so far are committed
        (the writer's count of records written); raises Unavailable when the writer cannot say
        within FRAME_DEADLINE_SECONDS."""
        client = self.client
        client.loop = client.loop or asyncio.get_running_loop()
        stream = await client.ready()
        while client.records:  # sent ahead of the flush frame, which the writer reads after
            records = list(client.records)
            client.records.clear()
            stream.write(audit_frames(records))
        batch_id = next(client.batch_ids)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        client.audit_flushes[batch_id] = answer
        stream.write(frame(("audit_flush", batch_id)))
        try:
            return int(await asyncio.wait_for(answer, FRAME_DEADLINE_SECONDS))
        except TimeoutError as error:
            raise Unavailable("the ledger writer did not answer an audit flush") from error
        finally:
            if client.audit_flushes.pop(batch_id, None) is not None:
                # given up on (its deadline, a cancelled caller): its late answer is dropped
                client.abandoned_audit_flushes.add(batch_id)

    async def stop(self) -> None:
        await self.client.close()
