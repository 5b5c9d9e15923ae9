"""The ledger writer process: the decision journal (service/journal.py) and the audit trail
(service/audit_trail.py) of one worker, on a unix socket (protocol.py). Started by the worker
(client.py) with MEDWALLET_LEDGER_WRITER=process:

    python -m authz_server.ledger.writer --socket PATH --database-url URL --redis-url URL

The journal's rules are unchanged: its transactions take the rebuild's fence and read the
published generation from Redis themselves (storage/sql/journal_fence.py), so a rebuild started
by any worker waits for them as before. SIGTERM: stops taking frames, writes what it holds,
exits. Its metrics are sent to its worker, which exports them (forwarded_metrics.py); the
journal's wait is the worker's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
from pathlib import Path

from authz_server.domain.errors import Unavailable
from authz_server.ledger.forwarded_metrics import (
    FORWARD_SECONDS,
    SEND_AFTER_BATCH_SECONDS,
    WriterMetrics,
)
from authz_server.ledger.protocol import (
    DATABASE_URL_VARIABLE,
    MAX_ROWS_PER_FRAME,
    REDIS_URL_VARIABLE,
    frame,
    portable,
    read_frame,
)
from authz_server.observability import logs, thread_names
from authz_server.runtime import event_loop
from authz_server.service.audit_trail import AuditTrail
from authz_server.service.journal import Journal
from authz_server.storage.redis.generation import published_generation
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.sql.database import Database

log = logging.getLogger(__name__)


class LedgerWriter:
    def __init__(self, database: Database, redis: PipelinedRedis) -> None:
        self.database = database
        self.redis = redis
        self.journal = Journal(database, functools.partial(published_generation, redis))
        self.audit = AuditTrail(database)
        self.metrics = WriterMetrics(on_batch=self._send_metrics_soon)
        self.metrics_send: asyncio.TimerHandle | None = None
        self.journal.observe = self.metrics.observer("journal")
        self.audit.observe = self.metrics.observer("audit")
        self.batches: set[asyncio.Task[None]] = set()
        self.streams: set[asyncio.StreamWriter] = set()
        # the worker's latest connection: where its metrics go (an older one may be closing)
        self.newest: asyncio.StreamWriter | None = None

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One worker's frames, until it goes away. A journal batch runs on by itself: its rows
        may commit after the worker stopped waiting (it answered them UNAVAILABLE; the till's
        retry finds the row, as after a lost SQL connection)."""
        self.streams.add(writer)
        self.newest = writer
        try:
            while True:
                message = await read_frame(reader)
                if message[0] == "journal":
                    _, batch_id, rows = message
                    if len(rows) > MAX_ROWS_PER_FRAME:  # the client never sends more
                        raise ConnectionError(f"a journal frame of {len(rows)} rows")
                    task = asyncio.create_task(self._journal(batch_id, rows, writer))
                    self.batches.add(task)
                    task.add_done_callback(self.batches.discard)
                elif message[0] == "audit":
                    self.audit.record(message[1])
                elif message[0] == "audit_flush":
                    task = asyncio.create_task(self._audit_flush(message[1], writer))
                    self.batches.add(task)
                    task.add_done_callback(self.batches.discard)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the worker went away, or the writer is stopping
        finally:
            self.streams.discard(writer)
            writer.close()

    async def _journal(
        self, batch_id: int, rows: list[dict[str, object]], writer: asyncio.StreamWriter
    ) -> None:
        outcomes = await asyncio.gather(
            *(self.journal.write(row) for row in rows), return_exceptions=True
        )
        if not writer.is_closing():
            writer.write(frame((batch_id, [portable(outcome) for outcome in outcomes])))

    async def _audit_flush(self, batch_id: int, writer: asyncio.StreamWriter) -> None:
        """The records received before this frame (record() took them as they came), and any
        others held, committed; answered with the count written or the error."""
        outcome: object
        try:
            outcome = await self.audit.flush()
        except Exception as error:
            outcome = portable(error)
        if not writer.is_closing():
            writer.write(frame((batch_id, [outcome])))

    def _send_metrics_soon(self) -> None:
        """After a batch (on the event loop): its figures go within SEND_AFTER_BATCH_SECONDS."""
        if self.metrics_send is None:
            self.metrics_send = asyncio.get_running_loop().call_later(
                SEND_AFTER_BATCH_SECONDS, self._send_metrics
            )

    def _send_metrics(self) -> None:
        """What its metrics did since the last send, to its worker's latest connection."""
        if self.metrics_send is not None:
            self.metrics_send.cancel()  # (a no-op when that timer is what runs this)
            self.metrics_send = None
        stream = self.newest
        if stream is None or stream.is_closing():
            return  # kept until the worker is connected again
        try:
            changes = self.metrics.take()
            if changes:
                stream.write(frame(("metrics", changes)))
        except Exception:
            log.exception("ledger writer: metrics not sent")

    async def forward_metrics(self) -> None:
        """Every FORWARD_SECONDS, whatever changed (batches are sent sooner)."""
        while True:
            await asyncio.sleep(FORWARD_SECONDS)
            self._send_metrics()

    async def stop(self) -> None:
        """Takes no more frames, answers the batches it has, writes what it holds."""
        for stream in list(self.streams):
            stream.close()
        await asyncio.gather(*self.batches, return_exceptions=True)
        await self.journal.stop()
        await self.audit.stop()
        await self.redis.aclose()
        self.database.close()


# How often the writer checks that the worker that started it is still there.
PARENT_CHECK_SECONDS = 1.0


async def _while_alive(parent_pid: int, stopping: asyncio.Event) -> None:
    """Stops the writer when its worker is gone (killed with -9, say): it would otherwise
    hold its SQL connections for ever."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_CHECK_SECONDS)
    log.warning("ledger writer: worker %d gone, stopping", parent_pid)
    stopping.set()


async def serve(
    socket: Path,
    database_url: str,
    redis_url: str,
    redis_timeout_seconds: float,
    parent_pid: int = 0,
) -> None:
    from authz_server.runtime.wiring import open_redis

    ledger = LedgerWriter(Database(database_url), open_redis(redis_url, redis_timeout_seconds))
    ledger.journal.start()
    ledger.audit.start()
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()
    # 0600 from its bind on, not only after a chmod: the socket accepts connections once bound,
    # and one made before the chmod (a local user of a group-writable umask) would stay open
    # and have its pickles loaded (protocol.py). The umask is the process's, for this moment.
    previous_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(ledger.connection, path=str(socket))
    finally:
        os.umask(previous_umask)
    os.chmod(socket, 0o600)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stopping.set)
    watch = loop.create_task(_while_alive(parent_pid, stopping)) if parent_pid else None
    forwarding = loop.create_task(ledger.forward_metrics())
    log.info("ledger writer serving on %s", socket)
    await stopping.wait()
    if watch is not None:
        watch.cancel()
    forwarding.cancel()
    server.close()
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()
    await ledger.stop()
    log.info("ledger writer stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m authz_server.ledger.writer")
    parser.add_argument("--socket", type=Path, required=True)
    # The URLs come in the environment (client.DATABASE_URL_VARIABLE, REDIS_URL_VARIABLE): a
    # process's arguments are readable by any local user, and URLs may hold credentials.
    parser.add_argument("--database-url", default=os.environ.get(DATABASE_URL_VARIABLE))
    parser.add_argument("--redis-url", default=os.environ.get(REDIS_URL_VARIABLE))
    parser.add_argument("--redis-timeout-seconds", type=float, default=0.5)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--event-loop", default="auto", help="as MEDWALLET_EVENT_LOOP")
    parser.add_argument("--parent-pid", type=int, default=0, help="stop when it is gone")
    arguments = parser.parse_args(argv)
    if not arguments.database_url or not arguments.redis_url:
        parser.error(f"{DATABASE_URL_VARIABLE} and {REDIS_URL_VARIABLE} must be set")
    logs.configure(arguments.log_level)
    # "mw-ledger" for top -H, ps -L and the benchmark's CPU by thread (loadtest/thread_cpu.py)
    thread_names.name_this_thread("ledger")
    try:
        event_loop.run(
            serve(arguments.socket, arguments.database_url, arguments.redis_url,
                  arguments.redis_timeout_seconds, arguments.parent_pid),
            event_loop.resolve(arguments.event_loop),
        )  # fmt: skip
    except Unavailable as error:
        log.error("ledger writer stopped: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
