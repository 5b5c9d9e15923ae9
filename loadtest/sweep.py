"""The worker sweep (issue 15): the benchmark's systems started with 1, 2, 4, 8 ... worker
processes in one run, and how each scales.

    python -m loadtest.benchmark --sweep-workers 1,2,4,8 --time-bound 5 --no-baseline
    python -m loadtest.benchmark --sweep-workers 1,2 --database-url postgresql+psycopg://...

One data set is generated; for each worker count N the service (a fresh SQLite file or
PostgreSQL schema, a fresh private Redis), the floor (loadtest/echo_server.py) and, unless
--no-baseline, the baseline are started with N workers and measured as `loadtest.benchmark`
measures them (Authorize and Authorize+Capture, uniform and hot spot, the service's exhaustion
check and quota check). The load grows with N: N x --concurrency calls in flight from
max(--clients, N) load processes, as the 16-core runs in loadtest/RESULTS.md did (32 per worker).
Counts above this machine's cores are skipped, with a note.

For each system, operation, workload and N: ops/s, server CPU µs per op, p50/p99 ms, the
scaling efficiency (ops/s at N / (N x ops/s at the smallest count, normally 1)) and, for the
service and the baseline, that efficiency over the floor's at the same N. Written to
--out/sweep.json and drawn in --out/sweep.png; each count's full run is in --out/w<N>/
(benchmark.json, benchmark.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.runtime.progress import Progress
from loadtest import benchmark
from loadtest.benchmark import COLORS, OPERATIONS, PACED, SYSTEMS, WORKLOADS, Run, log

FIGURES = ("throughput", "server_cpu_us", "p50_ms", "p99_ms")


def worker_counts(text: str) -> tuple[list[int], list[int]]:
    """The counts to run (sorted, no repeats) and those skipped: above this machine's cores."""
    counts = sorted({int(part) for part in text.split(",") if part.strip()})
    if not counts or counts[0] < 1:
        raise SystemExit(f"--sweep-workers: positive worker counts, not {text!r}")
    cores = os.cpu_count() or 1
    return [n for n in counts if n <= cores], [n for n in counts if n > cores]


def worker_axis(axis: Any, workers: list[int] | tuple[int, ...], label: str) -> None:
    """An x axis of worker counts (log 2, one tick per count) with the y axis from 0; the
    sweep's chart and loadtest/devbench_sweep_chart.py draw on it."""
    axis.set_xscale("log", base=2)
    axis.set_xticks(list(workers), [str(n) for n in workers])
    axis.minorticks_off()
    axis.set_xlabel(label)
    axis.set_ylim(bottom=0)
    axis.grid(True, alpha=0.3)


def count_run(arguments: argparse.Namespace, template: Run, base: Path, workers: int) -> Run:
    """A Run with `workers` server processes on the template's data, its load scaled to it."""
    scaled = argparse.Namespace(**vars(arguments))
    scaled.workers = workers
    scaled.clients = max(arguments.clients, workers)
    scaled.concurrency = arguments.concurrency * workers
    scaled.out = arguments.out / f"w{workers}"
    run = Run(scaled, base / f"w{workers}", workers)
    run.data, run.tokens = template.data, template.tokens
    run.quotas, run.relationships, run.uniform = (
        template.quotas,
        template.relationships,
        template.uniform,
    )
    run.hot, run.tills, run.items = template.hot, template.tills, template.items
    return run


def rows(runs: dict[int, Run]) -> list[dict[str, Any]]:
    """A row per system, operation, workload and worker count, with the efficiencies."""
    found: list[dict[str, Any]] = []
    for system in SYSTEMS:
        for operation in OPERATIONS:
            for workload in (*WORKLOADS, PACED):
                for workers, run in runs.items():
                    phase = benchmark.find(run, system, operation, workload)
                    if phase is None:
                        continue
                    found.append(
                        {
                            "system": system,
                            "operation": operation,
                            "workload": workload,
                            "workers": workers,
                            **{name: getattr(phase, name) for name in FIGURES},
                            "errors": sum(phase.errors.values()),
                            "over_quota": phase.over_quota,
                            "time_bound_hit": phase.time_bound_hit,
                            "pace_ops_per_s": phase.pace_ops_per_s,
                            # the busiest worker's event loop, share of a core
                            "event_loop_busy": phase.thread_cpu.get("busiest event loop"),
                            "thread_cpu": phase.thread_cpu,
                            "stage_ms": phase.stage_ms,
                        }
                    )
    for row in found:
        if row["workload"] == PACED:  # its throughput is the pace it was sent at: no scaling
            row["efficiency"] = None
            continue
        first = min((r for r in found if same_series(r, row)), key=lambda r: int(r["workers"]))
        per_worker = row["throughput"] / row["workers"]
        base = first["throughput"] / first["workers"]
        row["efficiency"] = per_worker / base if base else None
    for row in found:
        floor = next(
            (
                r
                for r in found
                if r["system"] == "floor"
                and (r["operation"], r["workload"], r["workers"])
                == (row["operation"], row["workload"], row["workers"])
            ),
            None,
        )
        row["efficiency_vs_floor"] = (
            benchmark.ratio(row["efficiency"], floor["efficiency"])
            if floor is not None and row["system"] != "floor"
            else None
        )
    return found


def same_series(one: dict[str, Any], other: dict[str, Any]) -> bool:
    return all(one[key] == other[key] for key in ("system", "operation", "workload"))


def two(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def summary(found: list[dict[str, Any]]) -> str:
    header = (
        f"{'system':<9}{'operation':<18}{'workload':<10}{'workers':>8}{'ops/s':>9}"
        f"{'server µs/op':>14}{'p50 ms':>9}{'p99 ms':>9}{'efficiency':>12}{'vs floor':>10}"
        f"{'loop busy':>11}{'loop lag ms':>13}{'journal ms':>12}"
    )
    lines = [header, "-" * len(header)]
    for row in found:
        bound = "*" if row["time_bound_hit"] else " "
        lines.append(
            f"{row['system']:<9}{row['operation']:<18}{row['workload']:<10}{row['workers']:>8}"
            f"{row['throughput']:>8,.0f}{bound}{row['server_cpu_us']:>14,.0f}"
            f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{two(row['efficiency']):>12}"
            f"{two(row['efficiency_vs_floor']):>10}{percent(row.get('event_loop_busy')):>11}"
            f"{stage(row, 'loop lag'):>13}{stage(row, 'journal wait'):>12}"
        )
    lines.append(
        "efficiency: ops/s at N workers / (N x ops/s at the smallest count); vs floor: that"
        " efficiency / the floor's at the same N and phase; paced: Authorize sent at"
        " --paced-fraction of that N's closed-loop throughput (target p99 ≤ 50 ms at 8 workers);"
        " loop busy: the busiest worker's event-loop thread, share of one core (near 100%: that"
        " process can do no more); loop lag: how late the event loops ran a timer, mean;"
        " journal: an Authorize's wait for its decision's commit, mean (loadtest/stage_times.py)"
    )
    if any(row["time_bound_hit"] for row in found):
        lines.append("* stopped by the time bound before all operations were done")
    return "\n".join(lines)


def stage(row: dict[str, Any], part: str) -> str:
    """A part's mean ms from the service's histograms, or '-' where it was not observed."""
    figures = (row.get("stage_ms") or {}).get(part)
    return "-" if not figures else f"{figures['mean_ms']:.2f}"


def chart(found: list[dict[str, Any]], counts: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("throughput", "operations per second"),
        ("efficiency", "scaling efficiency (1 = linear)"),
        ("server_cpu_us", "server CPU µs per operation"),
        ("p99_ms", "p99 latency, ms"),
    )
    markers = {"Authorize": "o", "Authorize+Capture": "s"}
    styles = {"uniform": "-", "hot spot": ":", PACED: "--"}
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for axis, (metric, label) in zip(axes.flat, panels, strict=True):
        series: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for row in found:
            series.setdefault((row["system"], row["operation"], row["workload"]), []).append(row)
        for (system, operation, workload), points in series.items():
            axis.plot(
                [point["workers"] for point in points],
                [point[metric] for point in points],
                linestyle=styles[workload],
                marker=markers[operation],
                color=COLORS[system],
                label=f"{system}, {operation}, {workload}",
            )
        if metric == "efficiency":
            axis.axhline(1.0, color="black", linewidth=0.8, alpha=0.5)
        worker_axis(axis, counts, "server workers")
        axis.set_title(label, fontsize=10)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_sweep(arguments: argparse.Namespace, command: str) -> int:
    counts, skipped = worker_counts(arguments.sweep_workers)
    cores = os.cpu_count()
    notes = [f"{n} workers skipped: this machine has {cores} cores" for n in skipped]
    for note in notes:
        print(f"note: {note}", flush=True)
    started_at = datetime.now(UTC)
    started = time.monotonic()
    arguments.out.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="mw-sweep-"))
    template = Run(arguments, directory, 0)
    runs: dict[int, Run] = {}
    failed: list[int] = []
    try:
        benchmark.prepare_data(template)
        # one line after each count (the phases draw their own bars in between)
        with Progress(
            len(counts), "sweep", unit="worker counts", interactive=False, log_seconds=math.inf
        ) as progress:
            for workers in counts:
                log(f"sweep: {workers} workers ({progress.count + 1} of {len(counts)})")
                run = count_run(arguments, template, directory, workers)
                redis = EmbeddedRedis(run.directory / "redis", persistent=False)
                try:
                    benchmark.measure_systems(run, redis)
                finally:
                    redis.stop()
                document = benchmark.write_results(run, command, datetime.now(UTC))
                if benchmark.report(run, document, started_at):
                    failed.append(workers)
                runs[workers] = run
                progress.advance(1)
                log(progress.line())
    finally:
        if arguments.keep:
            log(f"run directory kept: {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    found = rows(runs)
    ledger = "PostgreSQL" if arguments.database_url else "SQLite"
    document = {
        "date": started_at.isoformat(timespec="seconds"),
        "command": command,
        "machine": {
            "cpus": cores,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": {
                n: run.checks.get("load_average_at_start") for n, run in runs.items()
            },
        },
        "settings": {
            "worker_counts": counts,
            "skipped_worker_counts": skipped,
            "service_database": ledger,
            "event_loop": arguments.event_loop,
            "calls_in_flight_per_worker": arguments.concurrency,
            "load_generator_processes": {n: run.arguments.clients for n, run in runs.items()},
            "time_bound_seconds": arguments.time_bound,
            "relationships": arguments.relationships,
            "efficiency": "ops/s at N / (N x ops/s at the smallest count)",
        },
        "rows": found,
        "runs": {n: f"w{n}/benchmark.json" for n in runs},
        "failed_checks_at": failed,
        "notes": notes,
    }
    (arguments.out / "sweep.json").write_text(json.dumps(document, indent=1) + "\n")
    title = (
        f"MedWallet AuthZ worker sweep, {started_at:%Y-%m-%d %H:%M} UTC: {ledger} ledger,"
        f" {cores} cores, {arguments.concurrency} calls in flight per worker"
    )
    try:
        chart(found, counts, title, arguments.out / "sweep.png")
    except ImportError as error:  # the figures count more than their picture
        print(f"no chart drawn ({error}); the figures are in sweep.json", file=sys.stderr)
    print()
    print(title)
    print(summary(found))
    for note in notes:
        print(f"note: {note}")
    if failed:
        print(f"CHECKS FAILED at {', '.join(map(str, failed))} workers (see each table above)")
    print(
        f"sweep took {time.monotonic() - started:.0f}s; results in {arguments.out}/sweep.json"
        f" and sweep.png (each count in {arguments.out}/w<N>/)"
    )
    return 1 if failed else 0
