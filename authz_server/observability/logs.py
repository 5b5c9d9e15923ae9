"""JSON log lines on stderr: time, level, logger, message and the call's fields. Callers pass
only ids, codes and figures: never names, national ids or diagnoses.

Lines below WARNING (the access log's line per call) are formatted and written in batches,
within FLUSH_INTERVAL_SECONDS, by a thread of their own; a warning or an error is written at
once, after the lines queued before it. So a call pays for its LogRecord on the event loop,
not for a write(2) of its own too: on an echo server here the line cost ~70 µs of CPU a call
written line by line, ~40 µs batched (measured alone in a loop it is ~15 µs: between gRPC's
work it runs cold). On a clean exit logging.shutdown() writes what is queued; a process killed
outright loses at most that interval of INFO lines.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import deque
from typing import TextIO

from authz_server.observability.thread_names import name_this_thread

# How long an INFO line may wait to be written (and how often the writer thread wakes up).
FLUSH_INTERVAL_SECONDS = 0.2

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
# One encoder for every line (json.dumps with options builds a new one per call).
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


class JsonFormatter(logging.Formatter):
    # The time has a resolution of a second: formatted once per second, not once per line.
    _stamp: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second, stamp = self._stamp
        if int(record.created) != second:
            stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
            self._stamp = (int(record.created), stamp)
        line = {
            "time": stamp,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return _ENCODER.encode(line)


class BatchingStreamHandler(logging.Handler):
    """A StreamHandler whose lines below WARNING are written in batches (module docstring)."""

    def __init__(self, stream: TextIO, interval: float = FLUSH_INTERVAL_SECONDS) -> None:
        super().__init__()
        self.stream = stream
        # deque: append (the event loop) and popleft (the writer) are atomic under the GIL, so
        # no record appended while a batch is taken can be lost between the two.
        self.pending: deque[logging.LogRecord] = deque()
        # Held while a batch is formatted and written, so lines keep their order.
        self.writing = threading.Lock()
        self.closed = threading.Event()
        self.interval = interval
        self.writer = threading.Thread(target=self._write_every_interval, name="log-writer")
        self.writer.daemon = True
        self.writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        if record.args:  # the message as it is now, not as its arguments are when written
            try:
                record.msg, record.args = record.getMessage(), None
            except Exception:
                self.handleError(record)
                return
        self.pending.append(record)
        if record.levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        with self.writing:
            pending = self.pending
            records = [pending.popleft() for _ in range(len(pending))]
            if not records:
                return
            lines = []
            for record in records:
                try:
                    lines.append(self.format(record) + "\n")
                except Exception:
                    self.handleError(record)
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except Exception:
                self.handleError(records[-1])

    def _write_every_interval(self) -> None:
        name_this_thread("log")
        while not self.closed.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self.closed.set()
        self.flush()
        super().close()


def configure(level: str) -> None:
    # The lines never show the caller's file and line, thread or process names: don't collect
    # them for every record (logging HOWTO, "Optimization"; ~3 µs of the access log's ~15).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for old in logging.getLogger().handlers:
        if isinstance(old, BatchingStreamHandler):  # configured again: one writer thread
            old.close()
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(logging.WARNING)
