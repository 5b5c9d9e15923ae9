"""The service started several ways on the same data, alternated, measured on the same phases:
what one setting or one change of code costs, in one run, on a noisy machine.

    python -m loadtest.benchmark --no-baseline --systems variants \\
        --variant limiter-on: --variant limiter-off:MEDWALLET_RATE_LIMITS=false
    python -m loadtest.benchmark --no-baseline --systems variants \\
        --variant before@/work/before: --variant after:

A variant is NAME[@CHECKOUT]:[SETTING=VALUE,...]: its settings on top of the run's (the limits
are far above the load unless a variant sets MEDWALLET_MERCHANT_LIMIT or _CHANNEL_LIMIT), and, with
@CHECKOUT, the service's code from that directory (a git worktree of another commit: its
`authz_server` is imported instead of this one's; the schema must be one both can use). The
variants are started one after another, each measured, and the whole round repeated
(--variant-repeats) so a shared machine's drift falls on all of them; the summary is the
median of each variant's repeats and its ratio to the first variant.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import generate_data
from loadtest.benchmark import (
    HotState,
    Run,
    drop_schema,
    log,
    measure,
    python_command,
    service_environment,
    sqlite_or_schema,
)
from loadtest.processes import Server, free_port

# Far above any load the benchmark makes: the limiter refuses nothing, so its cost is what it
# does per admitted call.
UNLIMITED = "rate=1000000,burst=1000000,in_flight=1000000"
# (operation, workload) measured for each variant, each round
PHASES: tuple[tuple[str, str], ...] = (("Authorize", "uniform"),)


@dataclass(frozen=True)
class Variant:
    name: str
    settings: dict[str, str] = field(default_factory=dict)
    # another checkout's code (None: this one's)
    checkout: Path | None = None
    # PEM CA of the server's certificate when it serves TLS (set by `prepare`)
    tls_root: bytes | None = None


def parse(text: str) -> Variant:
    """'name[@checkout]:K=V,K=V' -> Variant (the settings may be empty: 'name:')."""
    head, separator, tail = text.partition(":")
    if not separator or not head:
        raise ValueError(f"--variant {text!r}: expected NAME[@CHECKOUT]:[SETTING=VALUE,...]")
    name, _, checkout = head.partition("@")
    settings: dict[str, str] = {}
    # a value may hold commas itself (a limit: rate=10,burst=10): a new setting starts at
    # ",MEDWALLET_"
    for item in filter(None, re.split(r",(?=MEDWALLET_)", tail)):
        key, equals, value = item.partition("=")
        if not equals or not key.startswith("MEDWALLET_"):
            raise ValueError(f"--variant {text!r}: {item!r} is not MEDWALLET_SETTING=VALUE")
        settings[key] = value
    path = Path(checkout).resolve() if checkout else None
    if path is not None and not (path / "authz_server" / "cli.py").is_file():
        raise ValueError(f"--variant {text!r}: {path} holds no authz_server")
    return Variant(name, settings, path)


def run_variants(
    run: Run,
    redis: HotState,
    variants: Sequence[Variant],
    repeats: int,
    *,
    label: str = "variants",
    phases: Sequence[tuple[str, str]] = PHASES,
    prepare: Callable[[Path, dict[str, str]], Sequence[Variant]] | None = None,
) -> dict[str, Any]:
    """Measures each variant `repeats` times, alternated; returns the summary (also kept in
    run.checks[label] and printed). `prepare(directory, env)` may turn the variants into
    others once the run's directory and base settings exist (a certificate, say)."""
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must differ: {names}")
    arguments = run.arguments
    # One database for all variants (they alternate on the same data): a SQLite file, or with
    # --database-url a private schema of that PostgreSQL database, dropped at the end.
    database_url, schema = sqlite_or_schema(arguments.database_url, run.directory, f"bench_{label}")
    try:
        return _measure_variants(
            run, redis, variants, repeats, label, phases, prepare, database_url
        )
    finally:
        drop_schema(arguments.database_url or "", schema)


def _measure_variants(
    run: Run,
    redis: HotState,
    variants: Sequence[Variant],
    repeats: int,
    label: str,
    phases: Sequence[tuple[str, str]],
    prepare: Callable[[Path, dict[str, str]], Sequence[Variant]] | None,
    database_url: str,
) -> dict[str, Any]:
    arguments = run.arguments
    env = service_environment(
        run, label, database_url, redis.url,
        MEDWALLET_MERCHANT_LIMIT=UNLIMITED, MEDWALLET_CHANNEL_LIMIT=UNLIMITED,
    )  # fmt: skip
    if prepare is not None:
        variants = prepare(run.directory, env)
    log(f"loading the data set into {database_url.split('?')[0]} with the bulk loader")
    generate_data.load(run.data, env=dict(env, REDIS_URL=""), batch_size=5000, stdout=sys.stderr)
    # The store's CPU: the one redis-server, or every node of a cluster (--redis-cluster).
    store_pids = list(redis.pids)
    for round_number in range(repeats):
        for variant in variants:
            log(f"round {round_number + 1} of {repeats}: starting the service: {variant.name}")
            server = _server(run, variant, env)
            server.start()
            try:
                time.sleep(1.0)
                for operation, workload in phases:
                    measure(run, variant.name, server, operation, workload, lambda: store_pids)
            finally:
                server.stop()
    figures = summary(run, variants)
    run.checks[label] = figures
    for line in summary_lines(figures):
        print(line)
    arguments.out.mkdir(parents=True, exist_ok=True)
    try:
        chart(figures, arguments.out / f"{label}.png", run.workers)
        run.charts.append(f"{label}.png")
    except ImportError as error:  # the figures count more than their picture
        log(f"no chart drawn ({error}); the figures are in benchmark.json")
    return figures


def _server(run: Run, variant: Variant, env: dict[str, str]) -> Server:
    port = free_port()
    settings = dict(env, MEDWALLET_GRPC_PORT=str(port), **variant.settings)
    command = python_command("authz_server.cli", "serve")
    if variant.checkout is not None:
        # -m puts the working directory first on sys.path: the checkout's package is imported
        settings["PYTHONPATH"] = str(variant.checkout)
        command = ["/usr/bin/env", "-C", str(variant.checkout), *command]
    if variant.tls_root is not None:
        run.tls_roots[variant.name] = variant.tls_root
    return Server(
        variant.name,
        command,
        settings,
        run.directory / f"{variant.name}.log",
        port,
        workers=run.workers,
        tls_root=variant.tls_root,
    )


def summary(run: Run, variants: Sequence[Variant]) -> dict[str, Any]:
    """Per variant and phase: the median over the repeats of throughput, p50, p99 and server
    and store CPU per call, each repeat's figures, and the ratios to the first variant."""
    figures: dict[str, Any] = {}
    for variant in variants:
        for phase_name in dict.fromkeys(f"{p.operation} {p.workload}" for p in run.phases):
            phases = [
                p
                for p in run.phases
                if p.system == variant.name and f"{p.operation} {p.workload}" == phase_name
            ]
            if not phases:
                continue
            figures.setdefault(phase_name, {})[variant.name] = {
                "ops_per_s": statistics.median(p.throughput for p in phases),
                "p50_ms": statistics.median(p.p50_ms for p in phases),
                "p99_ms": statistics.median(p.p99_ms for p in phases),
                "server_cpu_us": statistics.median(p.server_cpu_us for p in phases),
                "store_cpu_us": statistics.median(p.store_cpu_us or 0.0 for p in phases),
                "errors": sum(sum(p.errors.values()) for p in phases),
                "runs": [_figures(p) for p in phases],
            }
    return figures


def _figures(phase: Any) -> list[float]:
    return [round(phase.throughput), round(phase.p50_ms, 1), round(phase.p99_ms, 1),
            round(phase.server_cpu_us)]  # fmt: skip


def summary_lines(figures: dict[str, Any]) -> list[str]:
    lines = []
    for phase_name, by_variant in figures.items():
        lines.append(
            f"\n{phase_name}, median of the repeats: ops/s, p50 ms, p99 ms, server µs/op, store"
            " µs/op (each run's ops/s, p50, p99, server µs/op in brackets)"
        )
        base = next(iter(by_variant.values()))
        for name, values in by_variant.items():
            lines.append(
                f"  {name:<14} {values['ops_per_s']:8.0f} {values['p50_ms']:7.1f} "
                f"{values['p99_ms']:7.1f} {values['server_cpu_us']:7.0f} "
                f"{values['store_cpu_us']:5.0f}   "
                f"x{values['ops_per_s'] / base['ops_per_s']:.2f} throughput, "
                f"x{values['server_cpu_us'] / base['server_cpu_us']:.2f} CPU; errors "
                f"{values['errors']}; runs {values['runs']}"
            )
    return lines


def chart(figures: dict[str, Any], path: Path, workers: int) -> None:
    """Per phase: each variant's median server CPU per call and throughput (bars), and each
    repeat's figure (dots), so the spread is seen beside the difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(figures)
    figure, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), squeeze=False)
    for row, (phase_name, by_variant) in enumerate(figures.items()):
        names = list(by_variant)
        for column, (key, index, title) in enumerate(
            (
                ("server_cpu_us", 3, "server CPU µs per call (lower is better)"),
                ("ops_per_s", 0, "calls per second (higher is better)"),
            )
        ):
            axis = axes[row][column]
            bars = axis.bar(range(len(names)), [by_variant[n][key] for n in names], 0.6,
                            color="#4c72b0", alpha=0.7)  # fmt: skip
            axis.bar_label(bars, fmt="%.0f", fontsize=8)
            for position, name in enumerate(names):
                runs = [run[index] for run in by_variant[name]["runs"]]
                axis.plot([position] * len(runs), runs, "o", color="black", markersize=3)
            axis.set_xticks(range(len(names)))
            axis.set_xticklabels(names, fontsize=8)
            axis.set_title(f"{phase_name}: {title}", fontsize=10)
    figure.suptitle(
        f"Variants of the service, {workers} worker(s): median of the repeats (bars), each"
        " repeat (dots)",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
