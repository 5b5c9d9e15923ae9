"""The service's own threads named for the operating system, so `top -H`, `ps -L`, perf and the
benchmark (loadtest/thread_cpu.py) can tell which one uses the CPU: Python (before 3.14) names
a thread for itself only, and every thread shows the process's name ("python") to the kernel.

The names: THREAD_PREFIX then what the thread does ("mw-sql", "mw-log"). The event loop is the
process's main thread (its id is the process id); gRPC's own threads are "event_engine" or, for
its poller, unnamed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from typing import Any

THREAD_PREFIX = "mw-"
# Linux keeps 15 bytes of a thread's name (16 with the terminating NUL).
MAX_NAME_BYTES = 15


def _pthread_setname() -> Callable[..., Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = library.pthread_setname_np
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_ulong, ctypes.c_char_p]
    function.restype = ctypes.c_int
    setname: Callable[..., Any] = function
    return setname


_SETNAME = _pthread_setname()


def os_name(purpose: str) -> bytes:
    """The name the kernel gets for a thread doing `purpose` ("sql" -> b"mw-sql")."""
    return (THREAD_PREFIX + purpose).encode()[:MAX_NAME_BYTES]


def name_this_thread(purpose: str) -> None:
    """Names the calling thread for the operating system; nothing where that is not possible
    (a name is for people and tools, never a reason to fail)."""
    if _SETNAME is None:
        return
    try:
        _SETNAME(threading.get_ident(), os_name(purpose))
    except Exception:  # see above
        return
