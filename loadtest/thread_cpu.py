"""The server's CPU during a benchmark phase, by thread: the event loop (each process's main
thread), the SQL threads, gRPC's threads, the log writer. What stops a worker from scaling shows
here: an event loop near a whole core is a process that cannot do more (one GIL), a large SQL
or system share is work the event loop waits on or hands over.

Read from /proc (Linux): each thread's user and system time and its name. The service names its
own threads for the kernel (authz_server/observability/thread_names.py: "mw-sql", "mw-log");
gRPC's EventEngine threads are "event_engine"; the rest (gRPC's poller, the metrics server) keep
the process's name. A ledger writer process (MEDWALLET_LEDGER_WRITER=process) names its main
thread "mw-ledger": all its threads count as "ledger writer", apart from the workers' (and its
event loop is not one of the "busiest event loop" candidates). Elsewhere the figures are left out.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PROC = Path("/proc")
# kernel clock ticks a second (the unit of /proc/<pid>/task/<tid>/stat's times)
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

EVENT_LOOP = "event loop"
SQL = "SQL"
GRPC_ENGINE = "gRPC engine"
LOG_WRITER = "log writer"
OTHER = "gRPC poller, other"
LEDGER_WRITER = "ledger writer"
CLASSES = (EVENT_LOOP, SQL, GRPC_ENGINE, OTHER, LOG_WRITER, LEDGER_WRITER)
# the main thread's name in a ledger writer process (authz_server/ledger/writer.py)
LEDGER_WRITER_THREAD = "mw-ledger"


def kind(pid: int, tid: int, name: str) -> str:
    """Which of CLASSES a thread of a server process is."""
    if tid == pid:
        return EVENT_LOOP
    if name.startswith("mw-sql"):
        return SQL
    if name.startswith("mw-log"):
        return LOG_WRITER
    if name.startswith("event_engine"):
        return GRPC_ENGINE
    return OTHER


@dataclass
class Snapshot:
    # class -> (user seconds, system seconds), over every server process
    seconds: dict[str, tuple[float, float]] = field(default_factory=dict)
    # pid -> its event loop's user + system seconds
    event_loops: dict[int, float] = field(default_factory=dict)
    taken_at: float = field(default_factory=time.monotonic)


def _thread_times(pid: int, tid: int) -> tuple[str, float, float] | None:
    try:
        name = (PROC / str(pid) / "task" / str(tid) / "comm").read_text().strip()
        stat = (PROC / str(pid) / "task" / str(tid) / "stat").read_text()
    except OSError:  # the thread ended meanwhile
        return None
    # the fields after the name, which is in parentheses and may hold spaces
    fields = stat[stat.rindex(")") + 2 :].split()
    return name, int(fields[11]) / TICKS_PER_SECOND, int(fields[12]) / TICKS_PER_SECOND


def python_processes(root_pid: int) -> list[int]:
    """The server's process and its descendants that run Python (not a redis-server it
    started)."""
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in processes:
        try:
            name = process.name().lower()
            if "python" in name or "medwallet" in name or name == LEDGER_WRITER_THREAD:
                found.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def snapshot(root_pid: int) -> Snapshot:
    """Every thread's CPU so far, by class ({} where /proc is missing)."""
    taken = Snapshot()
    if not PROC.is_dir():
        return taken
    for pid in python_processes(root_pid):
        try:
            tids = [int(entry) for entry in os.listdir(PROC / str(pid) / "task")]
        except OSError:
            continue
        main = _thread_times(pid, pid)
        writer = main is not None and main[0] == LEDGER_WRITER_THREAD
        for tid in tids:
            times = _thread_times(pid, tid)
            if times is None:
                continue
            name, user, system = times
            thread_kind = LEDGER_WRITER if writer else kind(pid, tid, name)
            was_user, was_system = taken.seconds.get(thread_kind, (0.0, 0.0))
            taken.seconds[thread_kind] = (was_user + user, was_system + system)
            if thread_kind == EVENT_LOOP:
                taken.event_loops[pid] = user + system
    return taken


def during(before: Snapshot, after: Snapshot, operations: int) -> dict[str, float]:
    """Per class, µs of CPU per operation ("<class>") and the system share of it
    ("<class> system"); "busiest event loop": the busiest process's event loop, as a share of
    one core between the two snapshots. {} without figures."""
    seconds = after.taken_at - before.taken_at
    if not after.seconds or operations <= 0 or seconds <= 0:
        return {}
    found: dict[str, float] = {}
    for thread_kind in CLASSES:
        user, system = after.seconds.get(thread_kind, (0.0, 0.0))
        was_user, was_system = before.seconds.get(thread_kind, (0.0, 0.0))
        used = (user - was_user) + (system - was_system)
        if used <= 0:
            continue
        found[thread_kind] = used / operations * 1e6
        found[f"{thread_kind} system"] = (system - was_system) / used
    busiest = max(
        (spent - before.event_loops.get(pid, 0.0) for pid, spent in after.event_loops.items()),
        default=0.0,
    )
    found["busiest event loop"] = busiest / seconds
    return found


def line(figures: dict[str, float]) -> str:
    """'event loop 520 µs (18% system), SQL 190 µs (21% system), ...; busiest event loop 96% of
    a core'"""
    parts = [
        f"{thread_kind} {figures[thread_kind]:,.0f} µs ({figures[f'{thread_kind} system']:.0%}"
        " system)"
        for thread_kind in CLASSES
        if thread_kind in figures
    ]
    busiest = figures.get("busiest event loop")
    tail = f"; busiest event loop {busiest:.0%} of a core" if busiest is not None else ""
    return ", ".join(parts) + tail
