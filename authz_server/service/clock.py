"""Time, injectable so tests can move it (hold expiry, month edges)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


def milliseconds(moment: datetime) -> int:
    """A moment as Redis keeps it: whole milliseconds since the epoch."""
    return int(moment.timestamp() * 1000)


def from_milliseconds(value: int) -> datetime | None:
    """Redis's milliseconds as a moment; None for 0 (not set)."""
    return datetime.fromtimestamp(value / 1000, UTC) if value else None
