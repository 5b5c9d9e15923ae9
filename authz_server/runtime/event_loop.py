"""The asyncio event loop the server runs on (MEDWALLET_EVENT_LOOP): uvloop or asyncio's own.

uvloop (libuv) runs the same asyncio programs with less CPU per callback and per socket event.
The benchmark's floor and baseline servers take the same choice (loadtest/echo_server.py,
loadtest/baseline_server.py), so that all three are measured on one loop implementation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "asyncio", "uvloop")


def resolve(choice: str) -> str:
    """'asyncio' or 'uvloop': what `choice` means on this machine ('auto': uvloop when it can be
    imported, else asyncio). Asking for 'uvloop' where it is missing is an error, not a
    silent fallback: a measurement would otherwise not be what it says."""
    choice = choice.strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"event loop {choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError("MEDWALLET_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(coroutine: Coroutine[Any, Any, T], choice: str) -> T:
    """asyncio.run(coroutine) on the chosen event loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(coroutine)
