"""What OpenTelemetry tracing costs on Authorize (`python -m loadtest.benchmark --tracing-cost`).

In the service's run, after its own phases, the service is restarted with MEDWALLET_TRACING=true
exporting over OTLP/gRPC to a stand-in collector (loadtest/otlp_sink.py, another process, so
its CPU is not counted), measured on the uniform Authorize workload as system `traced`, then
restarted with tracing on but no OTLP endpoint (spans made, not exported) as `spans`, then
restarted with tracing off as `after`; `before` measures the same, tracing off, just before
(a bracket: the machine's load drifts), all on the same data, Redis and ledger.
The figures are printed and kept in benchmark.json (`checks.tracing`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest.processes import Server, free_port

Measure = Callable[..., Any]


def _start_sink(directory: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    count_file = directory / "otlp-spans.txt"
    command = [sys.executable, "-m", "loadtest.otlp_sink", "--port", str(port)]
    sink = subprocess.Popen([*command, "--count-file", str(count_file)])
    time.sleep(1.0)  # it binds within a second; the exporter retries meanwhile anyway
    return sink, port, count_file


def measure_tracing_cost(
    run: Any, server: Server, stores: Callable[[], list[int]], measure: Measure
) -> Server:
    """Measures `before`, `traced`, `spans` and `after`; returns the (untraced) server left
    running."""
    before = measure(run, "before", server, "Authorize", "uniform", stores)  # off, as it runs
    sink, port, count_file = _start_sink(run.directory)
    server.stop()
    traced_env = dict(
        server.env,
        MEDWALLET_TRACING="true",
        MEDWALLET_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
    )
    traced = replace(server, env=traced_env, log=run.directory / "traced.log", process=None)
    traced.start()
    try:
        on = measure(run, "traced", traced, "Authorize", "uniform", stores)
    finally:
        traced.stop()
        sink.terminate()
        sink.wait(timeout=30)
    spans = int(count_file.read_text()) if count_file.exists() else 0
    made_env = dict(server.env, MEDWALLET_TRACING="true", MEDWALLET_OTLP_ENDPOINT="")
    made = replace(server, env=made_env, log=run.directory / "spans.log", process=None)
    made.start()
    try:
        unexported = measure(run, "spans", made, "Authorize", "uniform", stores)
    finally:
        made.stop()
    untraced = replace(server, log=run.directory / "untraced.log", process=None)
    untraced.start()
    off = measure(run, "after", untraced, "Authorize", "uniform", stores)
    run.checks["tracing"] = {
        "spans_exported": spans,
        "spans_per_call": round(spans / max(1, on.operations), 2),
        "server_cpu_us_off_before": round(before.server_cpu_us, 1),
        "throughput_off_before": round(before.throughput, 1),
        "throughput_off": round(off.throughput, 1),
        "throughput_on": round(on.throughput, 1),
        "p50_ms_off": round(off.p50_ms, 2),
        "p50_ms_on": round(on.p50_ms, 2),
        "p99_ms_off": round(off.p99_ms, 2),
        "p99_ms_on": round(on.p99_ms, 2),
        "server_cpu_us_off": round(off.server_cpu_us, 1),
        "server_cpu_us_on": round(on.server_cpu_us, 1),
        "server_cpu_us_not_exported": round(unexported.server_cpu_us, 1),
        "throughput_not_exported": round(unexported.throughput, 1),
        "cpu_increase_percent": round(
            (on.server_cpu_us / off.server_cpu_us - 1) * 100 if off.server_cpu_us else 0.0, 1
        ),
    }
    return untraced


def summary(checks: dict[str, Any]) -> str | None:
    tracing = checks.get("tracing")
    if not tracing:
        return None
    t = tracing
    return (
        f"tracing cost on Authorize (uniform): off before {t['throughput_off_before']:.0f} ops/s,"
        f" {t['server_cpu_us_off_before']} µs CPU/op; off after {t['throughput_off']:.0f} ops/s,"
        f" p50"
        f" {t['p50_ms_off']} / p99 {t['p99_ms_off']} ms, {t['server_cpu_us_off']} µs CPU/op;"
        f" on (OTLP export) {t['throughput_on']:.0f} ops/s, p50 {t['p50_ms_on']} / p99"
        f" {t['p99_ms_on']} ms, {t['server_cpu_us_on']} µs CPU/op; spans made, not exported:"
        f" {t['throughput_not_exported']:.0f} ops/s, {t['server_cpu_us_not_exported']} µs CPU/op"
        f" ({t['cpu_increase_percent']:+.1f}% CPU/op; {t['spans_exported']:,} spans exported,"
        f" {t['spans_per_call']} a call)"
    )
