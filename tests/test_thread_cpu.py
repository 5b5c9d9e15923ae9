"""The benchmark's CPU by thread (loadtest/thread_cpu.py) finds the service's named threads
(authz_server/observability/thread_names.py) and charges each its own CPU."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from authz_server.observability.thread_names import name_this_thread, os_name
from loadtest import thread_cpu

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="threads' CPU and names are read from /proc"
)


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_named_threads_cpu_is_charged_to_its_kind_and_the_main_thread_to_the_event_loop() -> None:
    started = threading.Event()
    go = threading.Event()
    spun = threading.Event()
    leave = threading.Event()

    def sql_thread() -> None:
        name_this_thread("sql")
        started.set()
        go.wait(10)
        _spin(0.4)
        spun.set()
        leave.wait(10)  # alive at the second snapshot: an ended thread's times are gone

    worker = threading.Thread(target=sql_thread)
    worker.start()
    started.wait(10)
    comm = (
        open(f"/proc/{os.getpid()}/task/{worker.native_id}/comm").read().strip()  # noqa: SIM115
    )
    assert comm == os_name("sql").decode() == "mw-sql"

    before = thread_cpu.snapshot(os.getpid())
    go.set()
    _spin(0.2)  # the main thread: "event loop"
    spun.wait(10)
    after = thread_cpu.snapshot(os.getpid())
    leave.set()
    worker.join(10)
    figures = thread_cpu.during(before, after, operations=1000)

    # µs per operation: 0.4 s over 1,000 operations is ~400 µs (clock ticks are 10 ms)
    assert 300 <= figures[thread_cpu.SQL] <= 600
    assert 150 <= figures[thread_cpu.EVENT_LOOP] <= 400
    # this process's main thread, busy for part of the time between the snapshots (about a
    # third: the two threads take turns with the GIL; less on a loaded machine)
    assert 0.0 < figures["busiest event loop"] <= 1.05
    line = thread_cpu.line(figures)
    assert line.startswith("event loop ") and "SQL " in line and "of a core" in line


def test_kinds() -> None:
    assert thread_cpu.kind(10, 10, "python") == thread_cpu.EVENT_LOOP
    assert thread_cpu.kind(10, 11, "mw-sql") == thread_cpu.SQL
    assert thread_cpu.kind(10, 12, "mw-log") == thread_cpu.LOG_WRITER
    assert thread_cpu.kind(10, 13, "event_engine") == thread_cpu.GRPC_ENGINE
    assert thread_cpu.kind(10, 14, "python") == thread_cpu.OTHER


def test_no_figures_without_operations() -> None:
    taken = thread_cpu.snapshot(os.getpid())
    assert thread_cpu.during(taken, taken, operations=0) == {}
    assert os_name("a-very-long-purpose-name") == b"mw-a-very-long-"


def test_a_ledger_writer_process_is_charged_apart_from_the_workers() -> None:
    """A child process whose main thread is "mw-ledger" (authz_server/ledger/writer.py): its
    CPU goes to "ledger writer", not to "event loop", and it is no "busiest event loop"."""
    import subprocess

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from authz_server.observability.thread_names import name_this_thread\n"
            "name_this_thread('ledger')\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "end = time.thread_time() + 0.4\n"
            "while time.thread_time() < end: pass\n"
            "print('spun', flush=True)\n"
            "sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        before = thread_cpu.snapshot(os.getpid())
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "spun"
        after = thread_cpu.snapshot(os.getpid())  # alive still: its times are readable
        child.stdin.write("leave\n")
        child.stdin.flush()
    finally:
        child.wait(10)
    figures = thread_cpu.during(before, after, operations=1000)
    assert 300 <= figures[thread_cpu.LEDGER_WRITER] <= 600
    assert child.pid not in after.event_loops
