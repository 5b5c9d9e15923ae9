"""Frames between a worker and its ledger writer, on a unix socket: a 4-byte big-endian length,
then a pickle. Both ends are this service's own code, started by the worker itself (the socket
is in the worker's data directory, mode 0600), so pickle's trust in its input is the worker's
trust in itself.

Worker -> writer:  ("journal", batch id, [row, ...])   each row as Journal.write takes it
                   ("audit", [AuditRecord, ...])        fire and forget (at most
                                                        MAX_RECORDS_PER_FRAME a frame)
                   ("audit_flush", batch id)            the records sent so far, committed
Writer -> worker:  (batch id, [outcome, ...])           None, a StoredDecision, or an error
                                                        (an audit flush: [records written])
                   ("metrics", Changes)                 every second (forwarded_metrics.py)
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

from authz_server.domain.errors import Unavailable

# Where the writer process finds its worker's database and Redis URLs (not its arguments).
DATABASE_URL_VARIABLE = "MEDWALLET_LEDGER_WRITER_DATABASE_URL"
REDIS_URL_VARIABLE = "MEDWALLET_LEDGER_WRITER_REDIS_URL"

# A frame larger than this is refused (the connection is dropped): a journal batch of
# MAX_ROWS_PER_FRAME rows with their responses is ~1 MiB.
MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_ROWS_PER_FRAME = 2048
# Audit records a frame carries at most: the client keeps up to the audit trail's bound
# (MAX_BUFFERED_ROWS, 200,000) while its writer is away, ~400 bytes each with ids at their
# longest, which as one frame was over MAX_FRAME_BYTES (refused, and every record lost).
MAX_RECORDS_PER_FRAME = 10_000
_LENGTH = struct.Struct("!I")


def audit_frames(records: list[Any]) -> bytes:
    """`records` as audit frames of at most MAX_RECORDS_PER_FRAME records each."""
    return b"".join(
        frame(("audit", records[start : start + MAX_RECORDS_PER_FRAME]))
        for start in range(0, len(records), MAX_RECORDS_PER_FRAME)
    )


def frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message; raises asyncio.IncompleteReadError at the end of the stream."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_FRAME_BYTES:
        raise ConnectionError(f"a ledger frame of {length} bytes (limit {MAX_FRAME_BYTES})")
    return pickle.loads(await reader.readexactly(length))


def portable(outcome: Any) -> Any:
    """An outcome that unpickles in the worker as the caller expects it: the journal's own
    refusals (Unavailable and its kinds) as they are, any other error as Unavailable with its
    text (a driver's exception may not unpickle, and the caller answers it as one)."""
    if not isinstance(outcome, BaseException):
        return outcome  # None or a StoredDecision
    if isinstance(outcome, Unavailable):
        try:
            pickle.dumps(outcome)
            return outcome
        except Exception:
            pass
    return Unavailable(f"the ledger writer could not write it: {outcome!r}")
