"""Idempotent writes: the first answer is stored in the same transaction as the write.

A retry with the same key and the same request gets the stored answer (byte for byte); the same
key with another request is refused. The answer is stored encoded by the transport, so what a
client gets on a retry is exactly what it got the first time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.errors import IdempotencyKeyReused
from authz_server.storage.sql.tables import IdempotencyRecordRow

T = TypeVar("T")


@dataclass(frozen=True)
class Idempotency(Generic[T]):
    """One idempotent call: where its key lives, what the request was, how to store the answer."""

    scope: str
    key: str
    request_digest: str
    encode: Callable[[T], bytes]


def find(session: Session, call: Idempotency[T]) -> bytes | None:
    """The stored answer of an earlier identical call, None if first; raises on a reused key."""
    row = session.scalars(
        select(IdempotencyRecordRow).where(
            IdempotencyRecordRow.scope == call.scope,
            IdempotencyRecordRow.idempotency_key == call.key,
        )
    ).one_or_none()
    if row is None:
        return None
    if row.request_digest != call.request_digest:
        raise IdempotencyKeyReused(call.key)
    return row.response


def remember(session: Session, call: Idempotency[T], result: T, now: datetime) -> None:
    session.add(
        IdempotencyRecordRow(
            scope=call.scope,
            idempotency_key=call.key,
            request_digest=call.request_digest,
            response=call.encode(result),
            created_at=now,
        )
    )
