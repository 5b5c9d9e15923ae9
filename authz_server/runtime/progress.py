"""A tiny progress bar for long command-line work (bulk loads, month close, benchmarks).

    with Progress(total=1_000_000, label="participants") as progress:
        for batch in batches:
            ...
            progress.advance(len(batch))
            progress.note("participants.csv:17: pooling_region: ...")  # a line above the bar

On a terminal it redraws one line (bar, count/total, rate, ETA) at most `redraw_seconds` apart
(10 times a second by default); elsewhere (CI logs, pipes) it writes a plain line every
`log_seconds` instead, so logs stay readable. When the block ends it writes one summary line:
`participants: 1,000,000 rows in 8.2s (122,000 rows/s)`. No dependencies beyond the standard
library; the clock and the stream can be swapped for tests.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

BAR_WIDTH = 24


def _count(number: float) -> str:
    return f"{number:,.0f}"


def _rate(per_second: float) -> str:
    if per_second >= 10_000:
        return f"{per_second / 1000:,.0f}k"
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.1f}"


def _duration(seconds: float) -> str:
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Counts work done towards `total` (None when unknown) and shows it on `stream`."""

    def __init__(
        self,
        total: int | None,
        label: str,
        *,
        unit: str = "rows",
        stream: TextIO | None = None,
        redraw_seconds: float = 0.1,
        log_seconds: float = 10.0,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self._isatty() if interactive is None else interactive
        self.interval = redraw_seconds if self.interactive else log_seconds
        self.clock = clock
        self.count = 0
        self.started = clock()
        self.finished: float | None = None
        self._last_draw = self.started
        self._bar_shown = False

    def _isatty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(interrupted=kind is not None)

    @property
    def elapsed(self) -> float:
        end = self.finished if self.finished is not None else self.clock()
        return end - self.started

    @property
    def rate(self) -> float:
        """Units per second so far (0 before any time has passed)."""
        elapsed = self.elapsed
        return self.count / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int = 1) -> None:
        """Counts n more units done; redraws if the last redraw is old enough."""
        self.count += n
        now = self.clock()
        if now - self._last_draw >= self.interval:
            self._last_draw = now
            self._draw()

    def note(self, text: str) -> None:
        """Writes a line of its own (a warning, a rejected row) without garbling the bar."""
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, interrupted: bool = False) -> None:
        """Writes the summary line (once). Called by the `with` block's end."""
        if self.finished is not None:
            return
        self.finished = self.clock()
        self._clear()
        how = "stopped after" if interrupted else "done:"
        self.stream.write(
            f"{self.label}: {how} {_count(self.count)} {self.unit} in {self.elapsed:.1f}s"
            f" ({_rate(self.rate)} {self.unit}/s)\n"
        )
        self.stream.flush()

    def line(self) -> str:
        """The progress line as it would be drawn now."""
        parts = [self.label]
        rate = self.rate
        if self.total:
            fraction = min(1.0, self.count / self.total)
            filled = int(fraction * BAR_WIDTH)
            parts.append(f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}")
            parts.append(f"{_count(self.count)}/{_count(self.total)} {self.unit}")
        else:
            parts.append(f"{_count(self.count)} {self.unit}")
        parts.append(f"{_rate(rate)} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_duration(max(0, self.total - self.count) / rate)}")
        return "  ".join(parts)

    def _draw(self) -> None:
        if self.interactive:
            self.stream.write("\r\x1b[2K" + self.line())
            self._bar_shown = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[2K")
            self._bar_shown = False
