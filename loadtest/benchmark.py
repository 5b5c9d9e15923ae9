"""One command for the benchmark: the service against what the machine allows (an echo floor)
and against what a team might build instead (SQLAlchemy on PostgreSQL with SELECT FOR UPDATE).

    python -m loadtest.benchmark                      # SQLite for the service's ledger
    python -m loadtest.benchmark --database-url postgresql+psycopg://postgres@127.0.0.1/bench

In one run it generates a data set (python -m loadtest.generate_data) and loads it with the bulk
loader, starts a private non-persistent Redis on a unix socket, the service
(`medwallet-authz serve`, MEDWALLET_WORKERS processes) on 127.0.0.1, and measures, with the
same load generator (loadtest/loadgen.py) and the same request bytes:

  floor     a bare grpc.aio server answering with responses of the service's size, on the same
            event loop and the same number of worker processes (loadtest/echo_server.py);
  service   Authorize alone, and Authorize followed by Capture;
  baseline  the same on PostgreSQL, one transaction per call with SELECT ... FOR UPDATE
            (loadtest/baseline_server.py; only when PostgreSQL answers at
            --baseline-database-url, a private schema there, dropped afterwards);

each on a uniform workload (random families out of many) and a hot spot (one family). For
each it prints throughput, p50/p99 latency, the server's CPU time per operation (its process
tree's user+system time before/after, so the load generator's CPU is not counted), the data
store's CPU per operation (the private Redis; PostgreSQL backends of our connections), the
ratios to the floor and to the baseline, and the over-quota approvals, which must be 0: the
amounts approved per family are added up on the client and checked against the family's
quota, and against the quota figures the store holds after the run.

Results: loadtest/results/benchmark.json and loadtest/results/benchmark.png (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from authz_server.ledger.forwarded_metrics import SEND_AFTER_BATCH_SECONDS
from authz_server.runtime import event_loop
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.runtime.progress import Progress
from authz_server.settings import Settings
from loadtest import (
    dataset,
    generate_data,
    loadgen,
    sql_batches,
    stage_times,
    thread_cpu,
    tracing_cost,
)
from loadtest.processes import Server, cpu_seconds, free_port

RESULTS = dataset.ROOT / "loadtest" / "results"
DEFAULT_BASELINE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/bench"
LINE_FEN = (1_500, 1_500)
# A hot family's quota covers this share of the operations aimed at it, so the last ones
# must be declined: the over-quota guard is exercised, not just never reached.
HOT_SHARE = 0.9
OPERATIONS = ("Authorize", "Authorize+Capture")
# The guard itself: this many Authorize calls, 32 at a time, at a family whose quota fits
# EXHAUST_FITS of them; exactly EXHAUST_FITS must be approved (not timed, not in the ratios).
EXHAUST = "exhaust"
EXHAUST_SENT = 1_000
EXHAUST_FITS = 250
WORKLOADS = ("uniform", "hot spot")
# Authorize on the uniform workload, paced at --paced-fraction of the service's own closed-loop
# throughput (an open loop: loadgen.py): the "p99 at 80% of peak" (≤ 50 ms)
PACED = "paced"
P99_AT_PACE_TARGET_MS = 50.0
SYSTEMS = ("floor", "service", "service-cluster", "baseline")
COLORS = {
    "floor": "#9e9e9e",
    "service": "#1f77b4",
    "service-cluster": "#2ca02c",
    "baseline": "#d62728",
}
# The service, measured twice in one run with --redis-cluster: on one Redis node (`service`) and
# on a 3-primary + 3-replica Redis Cluster (`service-cluster`, tests/redis_cluster.py).
SERVICES = ("service", "service-cluster")
# The tracing-cost phases (--tracing-cost) run the service's own server: its quotas, its check.
LEDGER_OF = {"before": "service", "traced": "service", "spans": "service", "after": "service"}


@dataclass
class Phase:
    system: str
    operation: str
    workload: str
    operations: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    # calls sent again with their idempotency key (loadgen.RETRYABLE), by the first answer's code
    retries: dict[str, int] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    throughput: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    server_cpu_us: float = 0.0
    store_cpu_us: float | None = None
    capture_p50_ms: float | None = None
    capture_p99_ms: float | None = None
    response_bytes: float = 0.0
    over_quota: int | None = None
    time_bound_hit: bool = False
    # a paced phase: the operations a second it was sent at (None: closed loop)
    pace_ops_per_s: float | None = None
    # the service's SQL batches during the phase, per writer (loadtest/sql_batches.py)
    sql_batches: dict[str, dict[str, float]] = field(default_factory=dict)
    # the server's CPU by thread, µs/op and system shares (loadtest/thread_cpu.py)
    thread_cpu: dict[str, float] = field(default_factory=dict)
    # where a call's time went, from the service's histograms (loadtest/stage_times.py)
    stage_ms: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Run:
    arguments: argparse.Namespace
    directory: Path
    workers: int
    data: Path = field(init=False)
    tokens: Path = field(init=False)
    quotas: dict[str, int] = field(default_factory=dict)
    relationships: dict[str, list[str]] = field(default_factory=dict)
    uniform: list[str] = field(default_factory=list)
    hot: dict[str, str] = field(default_factory=dict)
    tills: list[str] = field(default_factory=list)
    items: tuple[str, str] = ("", "")
    phases: list[Phase] = field(default_factory=list)
    approved: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    samples: dict[str, bytes] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    # system -> PEM CA of its TLS certificate (loadtest/security_phases.py)
    tls_roots: dict[str, bytes] = field(default_factory=dict)
    # the charts this run drew in --out (benchmark.png, variants.png, security.png)
    charts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = self.directory / "data"
        self.tokens = self.data / dataset.TOKENS


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- data -------------------------------------------------------------------------------------


def prepare_data(run: Run) -> None:
    arguments = run.arguments
    amount = sum(LINE_FEN)
    hot_quotas = [
        math.floor(HOT_SHARE * (arguments.authorize_ops + arguments.warmup)) * amount,
        math.floor(HOT_SHARE * (arguments.capture_ops + arguments.warmup)) * amount,
        EXHAUST_FITS * amount,
    ]
    options = generate_data.Options(
        relationships=arguments.relationships,
        out=run.data,
        seed=arguments.seed,
        prefix="bn",
        hot_families=0,
        hot_quotas=hot_quotas,
    )
    summary = generate_data.generate(options)
    log("\n".join(summary.lines()))
    run.hot = dict(zip((*OPERATIONS, EXHAUST), summary.hot_families, strict=True))
    for row in dataset.read_csv(run.data / dataset.RELATIONSHIPS):
        beneficiary = row["beneficiary_id"]
        run.quotas[beneficiary] = run.quotas.get(beneficiary, 0) + int(row["quota_fen"])
        run.relationships.setdefault(beneficiary, []).append(row["relationship_id"])
    hot = set(run.hot.values())
    run.uniform = [b for b in run.relationships if b not in hot]
    workload = dataset.load_workload(run.data, run.tokens)
    run.tills = [token for _, token in workload.merchants["RETAIL_PHARMACY"][:32]]
    drugs = [code for code in workload.eligible_items if "-D" in code]
    devices = [code for code in workload.eligible_items if "-V" in code]
    run.items = (drugs[0], devices[0])


def sqlite_or_schema(url: str | None, directory: Path, label: str) -> tuple[str, str | None]:
    """The service's database: a SQLite file, or a private schema of the PostgreSQL database."""
    if not url:  # one file per label: each service run starts from the same fresh data
        return f"sqlite:///{directory / f'{label}.sqlite3'}", None
    import psycopg

    schema = f"{label}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo(url), autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}", schema


def conninfo(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    plain = parsed.set(drivername="postgresql", query={})
    return plain.render_as_string(hide_password=False)


def drop_schema(url: str, schema: str | None) -> None:
    if not schema:
        return
    import psycopg

    try:
        with psycopg.connect(conninfo(url), autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    except Exception as error:
        log(f"could not drop schema {schema}: {error}")


def postgres_reachable(url: str) -> str | None:
    """None if we can use the database (created when missing), else why not."""
    import psycopg
    from sqlalchemy.engine import make_url

    try:
        with psycopg.connect(conninfo(url), connect_timeout=3):
            return None
    except psycopg.OperationalError as error:
        if "does not exist" not in str(error):
            return str(error).strip().splitlines()[0]
    parsed = make_url(url)
    try:
        admin = parsed.set(drivername="postgresql", database="postgres", query={})
        with psycopg.connect(
            admin.render_as_string(hide_password=False), autocommit=True, connect_timeout=3
        ) as connection:
            connection.execute(f'CREATE DATABASE "{parsed.database}"')
        return None
    except Exception as error:
        return str(error).strip().splitlines()[0]


def backend_pids(url: str, application_name: str) -> list[int]:
    import psycopg

    try:
        with psycopg.connect(conninfo(url), autocommit=True, connect_timeout=3) as connection:
            rows = connection.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (application_name,),
            ).fetchall()
        return [row[0] for row in rows]
    except Exception:
        return []


# --- phases -----------------------------------------------------------------------------------


def plans(
    run: Run,
    system: str,
    address: str,
    operation: str,
    workload: str,
    pace_per_second: float = 0.0,
) -> list[loadgen.Plan]:
    arguments = run.arguments
    capture = operation == "Authorize+Capture"
    total = arguments.capture_ops if capture else arguments.authorize_ops
    warmup = arguments.warmup
    clients = arguments.clients
    beneficiaries = run.uniform if workload in ("uniform", PACED) else [run.hot[operation]]
    if workload == EXHAUST:
        total, warmup, beneficiaries = EXHAUST_SENT, 0, [run.hot[EXHAUST]]
    if pace_per_second:  # the time bound ends it, or the phase's count at that pace
        total = max(clients, min(total, math.ceil(pace_per_second * arguments.time_bound * 1.2)))
    # the phase's number too: a system measured more than once never reuses a key
    key = f"{system[:2]}{len(run.phases)}{'c' if capture else 'a'}{workload[0]}-"
    return [
        loadgen.Plan(
            address=address,
            capture=capture,
            operations=total // clients + (1 if index < total % clients else 0),
            warmup=warmup // clients,
            concurrency=max(1, arguments.concurrency // clients),
            channels=arguments.channels,
            tokens=run.tills,
            beneficiaries=beneficiaries,
            items=run.items,
            line_fen=LINE_FEN,
            key_prefix=f"{key}{index}-",
            time_bound=arguments.time_bound,
            seed=arguments.seed * 100 + index,
            tls_root=run.tls_roots.get(system),
            pace_per_second=pace_per_second / clients,
        )
        for index in range(clients)
    ]


def measure(
    run: Run,
    system: str,
    server: Server,
    operation: str,
    workload: str,
    store_pids: Any,
    profile: bool = False,
    pace_per_second: float = 0.0,
) -> Phase:
    context = multiprocessing.get_context("spawn")
    worker_plans = plans(run, system, server.address, operation, workload, pace_per_second)
    start = context.Event()
    ready = context.Semaphore(0)
    results = context.Queue()
    counters = [context.Value("q", 0, lock=False) for _ in worker_plans]
    processes = [
        context.Process(target=loadgen.worker, args=(plan, counter, start, ready, results))
        for plan, counter in zip(worker_plans, counters, strict=True)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        if not ready.acquire(timeout=300):
            raise RuntimeError("the load generator did not finish its warm-up")
    profilers = start_profilers(run, system, server, operation, workload) if profile else []
    stores = store_pids()
    metrics_before = sql_batches.fetch(server.metrics_port)
    threads_before = thread_cpu.snapshot(server.pid)
    cpu_before = server.cpu()
    store_before = cpu_seconds(stores, tree=False) if stores else None
    start.set()
    reports: list[loadgen.Report] = []
    total = sum(plan.operations for plan in worker_plans)
    label = f"{system:<8} {operation:<17} {workload:<8}"
    with Progress(total, label, unit="ops") as progress:
        while len(reports) < len(processes):
            try:
                item = results.get(timeout=0.1)
            except Exception:
                item = None
            if isinstance(item, BaseException):
                raise RuntimeError(f"a load-generator process failed: {item!r}")
            if item is not None:
                reports.append(item)
            done = sum(counter.value for counter in counters)
            if done > progress.count:
                progress.advance(done - progress.count)
            alive = any(process.is_alive() for process in processes)
            if item is None and not alive and results.empty():
                raise RuntimeError("a load-generator process died")
    cpu_after = server.cpu()
    threads_after = thread_cpu.snapshot(server.pid)
    # A ledger writer process (MEDWALLET_LEDGER_WRITER=process) sends its batches' figures to
    # its worker within SEND_AFTER_BATCH_SECONDS: the phase's last ones are waited for.
    time.sleep(2 * SEND_AFTER_BATCH_SECONDS)
    metrics_after = sql_batches.fetch(server.metrics_port)
    stores_after = store_pids()
    store_after = cpu_seconds(stores_after, tree=False) if stores_after else None
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        try:
            profiler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            profiler.kill()
    for process in processes:
        process.join(timeout=30)
    phase = Phase(system, operation, workload)
    latencies = sorted(latency for report in reports for latency in report.latencies)
    phase.operations = len(latencies)
    errors: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    decisions: Counter[str] = Counter()
    for report in reports:
        errors.update(report.errors)
        retries.update(report.retries)
        decisions.update(report.decisions)
        for name, value in (
            ("authorize", report.sample_authorize),
            ("capture", report.sample_capture),
        ):
            if value and f"{system}:{name}" not in run.samples:
                run.samples[f"{system}:{name}"] = value
    phase.errors = dict(errors)
    phase.retries = dict(retries)
    phase.decisions = dict(decisions)
    started = min(report.started for report in reports)
    ended = max(report.ended for report in reports)
    phase.seconds = ended - started
    # a paced phase runs for the time bound by design
    phase.time_bound_hit = not pace_per_second and phase.seconds >= run.arguments.time_bound * 0.99
    phase.pace_ops_per_s = pace_per_second or None
    phase.sql_batches = sql_batches.during(
        sql_batches.parse(metrics_before), sql_batches.parse(metrics_after)
    )
    phase.stage_ms = stage_times.during(
        stage_times.parse(metrics_before), stage_times.parse(metrics_after)
    )
    completed = sum(report.operations for report in reports)
    phase.throughput = len(latencies) / phase.seconds if phase.seconds > 0 else 0.0
    if latencies:
        phase.p50_ms = latencies[len(latencies) // 2] * 1000
        phase.p99_ms = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
        phase.mean_ms = statistics.fmean(latencies) * 1000
    captures = sorted(latency for report in reports for latency in report.capture_latencies)
    if captures:
        phase.capture_p50_ms = captures[len(captures) // 2] * 1000
        phase.capture_p99_ms = captures[min(len(captures) - 1, int(len(captures) * 0.99))] * 1000
    phase.server_cpu_us = (cpu_after - cpu_before) / max(1, completed) * 1e6
    phase.thread_cpu = thread_cpu.during(threads_before, threads_after, completed)
    if store_before is not None and store_after is not None:
        phase.store_cpu_us = max(0.0, store_after - store_before) / max(1, completed) * 1e6
    responses = sum(report.responses for report in reports)
    phase.response_bytes = sum(r.response_bytes for r in reports) / responses if responses else 0
    if system != "floor":
        ledger = LEDGER_OF.get(system, system)  # the tracing phases spend the service's quotas
        totals = run.approved.setdefault(ledger, {})
        for report in reports:
            for beneficiary, (fen, count) in report.approved.items():
                entry = totals.setdefault(beneficiary, [0, 0])
                entry[0] += fen
                entry[1] += count
        phase.over_quota = over_quota(run, totals)
        previous = sum(
            p.over_quota or 0 for p in run.phases if LEDGER_OF.get(p.system, p.system) == ledger
        )
        phase.over_quota -= previous
    run.phases.append(phase)
    return phase


def paced(run: Run, system: str, server: Server, store_pids: Any) -> None:
    """Authorize (uniform) sent at --paced-fraction of the closed-loop throughput just measured:
    the latency at a load the system keeps up with, not at saturation."""
    fraction = run.arguments.paced_fraction
    peak = find(run, system, "Authorize", "uniform")
    if fraction <= 0 or peak is None or peak.throughput <= 0:
        return
    measure(run, system, server, "Authorize", PACED, store_pids,
            pace_per_second=fraction * peak.throughput)  # fmt: skip


def exhaust(run: Run, system: str, server: Server, store_pids: Any) -> None:
    """EXHAUST_SENT concurrent Authorize calls at a quota that fits EXHAUST_FITS."""
    phase = measure(run, system, server, "Authorize", EXHAUST, store_pids)
    approved = phase.decisions.get("DECISION_APPROVED", 0)
    run.checks[f"{system}_exhaust"] = {
        "sent": EXHAUST_SENT,
        "fit_in_quota": EXHAUST_FITS,
        "approved": approved,
        "declined": phase.decisions.get("DECISION_DECLINED", 0),
        "errors": sum(phase.errors.values()),
        "exact": approved == EXHAUST_FITS,
    }


def over_quota(run: Run, totals: dict[str, list[int]]) -> int:
    """Approvals beyond each family's quota, from the amounts the clients saw approved."""
    amount = sum(LINE_FEN)
    over = 0
    for beneficiary, (fen, _) in totals.items():
        excess = fen - run.quotas.get(beneficiary, 0)
        if excess > 0:
            over += math.ceil(excess / amount)
    return over


def find_py_spy() -> str | None:
    """py-spy beside this Python, on PATH, or in a bin/ folder of a sys.path entry (where
    `pip install --target` puts a wheel's programs: the offline bundle's install)."""
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found:
        return found
    for entry in sys.path:
        candidate = Path(entry or ".") / "bin" / "py-spy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def start_profilers(
    run: Run, system: str, server: Server, operation: str, workload: str
) -> list[subprocess.Popen[bytes]]:
    spy = find_py_spy()
    if not spy:
        run.notes.append("--profile: py-spy is not installed (pip install py-spy)")
        return []
    pid = server.worker_pids()[0]
    stem = f"profile-{system}-{operation.replace('+', '-').lower()}-{workload.replace(' ', '-')}"
    profilers = []
    for suffix, form in ((".svg", "flamegraph"), (".txt", "raw")):
        path = run.arguments.out / f"{stem}{suffix}"
        command = [spy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
                   "--format", form, "-o", str(path)]  # fmt: skip
        with (run.directory / f"{stem}{suffix}.log").open("wb") as spy_log:
            profilers.append(subprocess.Popen(command, stdout=spy_log, stderr=subprocess.STDOUT))
        run.profiles.append(str(path))
    time.sleep(0.5)
    return profilers


# --- the systems ------------------------------------------------------------------------------


def python_command(module: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", module, *arguments]


@dataclass(frozen=True)
class HotState:
    """The Redis a service run uses: its URL, the processes whose CPU is the store's, and a
    redis-py client to check the quotas with after the run."""

    url: str
    pids: list[int]
    client: Callable[[], Any]


def one_node(redis: EmbeddedRedis) -> HotState:
    import redis as redis_client

    assert redis.process is not None
    return HotState(
        redis.url,
        [redis.process.pid],
        lambda: redis_client.Redis(unix_socket_path=str(redis.socket)),
    )


def cluster_of(cluster: Any) -> HotState:
    """A running tests/redis_cluster.py cluster: every node's CPU (replicas replicate the
    writes) counts as the store's."""
    from redis.cluster import ClusterNode, RedisCluster

    ports = cluster.primary_ports()
    seeds = ",".join(f"127.0.0.1:{port}" for port in ports)
    pids = [node.process.pid for node in cluster.nodes if node.process is not None]
    return HotState(
        f"redis+cluster://{seeds}",
        pids,
        lambda: RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", port) for port in ports]  # type: ignore[no-untyped-call]
        ),
    )


def service_environment(
    run: Run, label: str, database_url: str, redis_url: str, **settings: str
) -> dict[str, str]:
    """The service's environment in a run: its data folder, ledger and Redis, the run's tokens,
    `settings`, then the run's --service-env, and the run's event loop."""
    env = dict(
        os.environ,
        MEDWALLET_DATA_DIR=str(run.directory / label),
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        MEDWALLET_TOKENS_FILE=str(run.tokens),
        MEDWALLET_GRPC_HOST="127.0.0.1",
        MEDWALLET_METRICS_PORT="0",
        MEDWALLET_WORKERS=str(run.workers),
        MEDWALLET_PHARMACY_HOLD_SECONDS="7200",
        **settings,
    )
    env.update(setting.split("=", 1) for setting in run.arguments.service_env)
    env["MEDWALLET_EVENT_LOOP"] = run.arguments.event_loop  # the floor's and the baseline's too
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def run_service(run: Run, redis: HotState, system: str = "service") -> None:
    arguments = run.arguments
    name = system.replace("-", "_")
    database_url, schema = sqlite_or_schema(arguments.database_url, run.directory, f"bench_{name}")
    if schema:
        database_url += f"&application_name=mw-bench-{system}"
    env = service_environment(run, system, database_url, redis.url)
    metrics_port = free_port()  # scraped around each phase for its SQL batches
    log(f"loading the data set into {database_url.split('?')[0]} with the bulk loader")
    started = time.monotonic()
    generate_data.load(run.data, env=dict(env, REDIS_URL=""), batch_size=5000, stdout=sys.stderr)
    run.checks["bulk_load_seconds"] = round(time.monotonic() - started, 1)
    port = free_port()
    env["MEDWALLET_GRPC_PORT"] = str(port)
    env["MEDWALLET_METRICS_PORT"] = str(metrics_port)
    server = Server(
        system,
        python_command("authz_server.cli", "serve"),
        env,
        run.directory / f"{system}.log",
        port,
        workers=run.workers,
        metrics_port=metrics_port,
    )
    log(f"starting the {system} ({run.workers} workers; start-up reconciles Redis from SQL)")
    started = time.monotonic()
    server.start()
    run.checks[f"{name}_start_seconds"] = round(time.monotonic() - started, 1)

    def stores() -> list[int]:
        pids = list(redis.pids)
        if schema:
            pids += backend_pids(arguments.database_url, f"mw-bench-{system}")
        return pids

    try:
        for operation in OPERATIONS:
            for workload in WORKLOADS:
                profile = arguments.profile and workload == "uniform"
                measure(run, system, server, operation, workload, stores, profile)
        paced(run, system, server, stores)
        if arguments.tracing_cost and system == "service":
            server = tracing_cost.measure_tracing_cost(run, server, stores, measure)
        exhaust(run, system, server, stores)
        run.checks[system] = verify_service(run, redis, database_url, system)
    finally:
        server.stop()
        drop_schema(arguments.database_url or "", schema)


def verify_service(
    run: Run, redis: HotState, database_url: str, system: str = "service"
) -> dict[str, Any]:
    """Quota figures after the run: for every family the clients were approved money for,
    held (Redis) + captured (SQL) must equal what the clients saw approved, and allocated =
    available + held + captured; the hot families also through GetRelationship."""
    from sqlalchemy import create_engine, text

    from authz_server.storage.redis import keys

    approved = run.approved.get(system, {})
    client = redis.client()
    engine = create_engine(database_url)
    with engine.connect() as connection:
        captured = {
            row.relationship_id: (row.allocated_total_fen, row.captured_total_fen)
            for row in connection.execute(
                text(
                    "SELECT relationship_id, allocated_total_fen, captured_total_fen"
                    " FROM relationships"
                )
            )
        }
    engine.dispose()
    mismatched, broken, checked = [], [], 0
    pipeline = client.pipeline(transaction=False)
    order = []
    for beneficiary in approved:
        for relationship_id in run.relationships.get(beneficiary, []):
            pipeline.hmget(keys.quota(beneficiary, relationship_id), "available", "held")
            order.append((beneficiary, relationship_id))
    figures = pipeline.execute()
    per_family: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for (beneficiary, relationship_id), (available, held) in zip(order, figures, strict=True):
        allocated, spent = captured.get(relationship_id, (0, 0))
        family = per_family[beneficiary]
        family[0] += allocated
        family[1] += int(available or 0)
        family[2] += int(held or 0)
        family[3] += spent
    for beneficiary, (allocated, available, held, spent) in per_family.items():
        checked += 1
        if held + spent != approved[beneficiary][0]:
            mismatched.append(beneficiary)
        if allocated != available + held + spent or available < 0:
            broken.append(beneficiary)
    client.close()
    hot = {}
    for operation, beneficiary in run.hot.items():
        allocated, available, held, spent = per_family.get(beneficiary, [0, 0, 0, 0])
        hot[operation] = {
            "beneficiary": beneficiary,
            "quota_fen": run.quotas[beneficiary],
            "approved_fen_seen_by_clients": approved.get(beneficiary, [0, 0])[0],
            "available_fen": available,
            "held_fen": held,
            "captured_fen": spent,
        }
    return {
        "families_checked": checked,
        "approved_differs_from_store": len(mismatched),
        "conservation_broken": len(broken),
        "hot_families": hot,
    }


def sample_authorize(run: Run) -> bytes:
    """An answer shaped like the service's, for a floor measured without the service."""
    from authz_server.generated.medwallet.v1 import authorization_pb2

    beneficiary = run.uniform[0]
    return authorization_pb2.AuthorizeResponse(
        authorization_id=uuid.uuid4().hex,
        decision=authorization_pb2.DECISION_APPROVED,
        approved_amount_fen=sum(LINE_FEN),
        line_results=[
            authorization_pb2.LineResult(item_code=code, approved=True, approved_amount_fen=fen)
            for code, fen in zip(run.items, LINE_FEN, strict=True)
        ],
        funding=[
            authorization_pb2.FundingPart(
                relationship_id=run.relationships[beneficiary][0], amount_fen=sum(LINE_FEN)
            )
        ],
        remaining_quota_fen=100_000,
        expires_at=Timestamp(seconds=int(time.time()) + 900, nanos=123_000_000),
        status=authorization_pb2.AUTHORIZATION_STATUS_PENDING,
    ).SerializeToString()


def sample_capture(run: Run) -> bytes:
    from authz_server.generated.medwallet.v1 import authorization_pb2, common_pb2

    beneficiary = run.uniform[0]
    return authorization_pb2.CaptureResponse(
        authorization=authorization_pb2.Authorization(
            authorization_id=uuid.uuid4().hex,
            merchant_id="bn-ph-110100-001",
            beneficiary_id=beneficiary,
            purpose=common_pb2.PURPOSE_PHARMACY,
            status=authorization_pb2.AUTHORIZATION_STATUS_CAPTURED,
            approved_amount_fen=sum(LINE_FEN),
            captured_amount_fen=sum(LINE_FEN),
            funding=[
                authorization_pb2.FundingPart(
                    relationship_id=run.relationships[beneficiary][0], amount_fen=sum(LINE_FEN)
                )
            ],
        )
    ).SerializeToString()


def run_floor(run: Run) -> None:
    authorize = run.samples.get("service:authorize") or sample_authorize(run)
    capture = run.samples.get("service:capture") or sample_capture(run)
    (run.directory / "authorize.bin").write_bytes(authorize)
    (run.directory / "capture.bin").write_bytes(capture)
    port = free_port()
    server = Server(
        "floor",
        python_command(
            "loadtest.echo_server",
            "--port",
            str(port),
            "--workers",
            str(run.workers),
            "--authorize-response",
            str(run.directory / "authorize.bin"),
            "--capture-response",
            str(run.directory / "capture.bin"),
            "--event-loop",
            run.arguments.event_loop,
        ),
        dict(os.environ, PYTHONPATH=str(dataset.ROOT)),
        run.directory / "floor.log",
        port,
        workers=run.workers,
    )
    server.start()
    try:
        for operation in OPERATIONS:
            for workload in WORKLOADS:
                measure(run, "floor", server, operation, workload, list)
    finally:
        server.stop()


def run_baseline(run: Run) -> None:
    import psycopg

    arguments = run.arguments
    url = arguments.baseline_database_url
    why = postgres_reachable(url)
    if why is not None:
        run.notes.append(f"baseline skipped: PostgreSQL at {url} is not reachable ({why})")
        log(run.notes[-1])
        return
    from loadtest import baseline_server

    schema = f"bl_{uuid.uuid4().hex[:12]}"
    application = f"mw-baseline-{schema}"
    log(f"baseline: loading the quotas into {url.split('?')[0]} (schema {schema})")
    try:
        with psycopg.connect(conninfo(url), autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}")
            connection.execute(f"SET search_path TO {schema}")
            connection.execute(baseline_server.SCHEMA)
            rows = dataset.read_csv(run.data / dataset.RELATIONSHIPS)
            with connection.cursor() as cursor:
                columns = (
                    "relationship_id, beneficiary_id, holder_id, funding_order, status,"
                    " allocated_fen, available_fen"
                )
                with cursor.copy(f"COPY quotas ({columns}) FROM STDIN") as copy:
                    for order, row in enumerate(rows):
                        quota = int(row["quota_fen"])
                        copy.write_row(
                            (row["relationship_id"], row["beneficiary_id"], row["holder_id"],
                             order, "ACTIVE", quota, quota)
                        )  # fmt: skip
            connection.execute("ANALYZE quotas")
        port = free_port()
        server = Server(
            "baseline",
            python_command(
                "loadtest.baseline_server",
                "--port",
                str(port),
                "--workers",
                str(run.workers),
                "--database-url",
                url,
                "--schema",
                schema,
                "--application-name",
                application,
                "--tokens",
                str(run.tokens),
                "--data-dir",
                str(run.data),
                "--event-loop",
                arguments.event_loop,
            ),
            dict(os.environ, PYTHONPATH=str(dataset.ROOT)),
            run.directory / "baseline.log",
            port,
            workers=run.workers,
        )
        server.start()
        try:
            for operation in OPERATIONS:
                for workload in WORKLOADS:
                    measure(
                        run, "baseline", server, operation, workload,
                        lambda: backend_pids(url, application),
                    )  # fmt: skip
            exhaust(run, "baseline", server, lambda: backend_pids(url, application))
        finally:
            server.stop()
        run.checks["baseline"] = verify_baseline(run, url, schema)
    finally:
        drop_schema(url, schema)


def verify_baseline(run: Run, url: str, schema: str) -> dict[str, Any]:
    import psycopg

    approved = run.approved.get("baseline", {})
    with psycopg.connect(conninfo(url), autocommit=True) as connection:
        rows = connection.execute(
            f"SELECT beneficiary_id, sum(allocated_fen), sum(available_fen), sum(held_fen),"
            f" sum(captured_fen) FROM {schema}.quotas GROUP BY beneficiary_id"
        ).fetchall()
    mismatched = broken = checked = 0
    for beneficiary, allocated, available, held, captured in rows:
        if beneficiary not in approved:
            continue
        checked += 1
        if held + captured != approved[beneficiary][0]:
            mismatched += 1
        if allocated != available + held + captured or available < 0:
            broken += 1
    return {
        "families_checked": checked,
        "approved_differs_from_store": mismatched,
        "conservation_broken": broken,
    }


# --- reporting --------------------------------------------------------------------------------


def find(run: Run, system: str, operation: str, workload: str) -> Phase | None:
    for phase in run.phases:
        if (phase.system, phase.operation, phase.workload) == (system, operation, workload):
            return phase
    return None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def ratios(run: Run) -> list[dict[str, Any]]:
    """Service against floor and baseline, with the issue's targets where it sets one."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, ok: bool | None) -> None:
        rows.append({"ratio": name, "value": value, "target": target, "met": ok})

    for operation in OPERATIONS:
        for workload in WORKLOADS:
            service = find(run, "service", operation, workload)
            floor = find(run, "floor", operation, workload)
            baseline = find(run, "baseline", operation, workload)
            if service is None:
                continue
            name = f"{operation}, {workload}"
            if floor is not None:
                cpu = ratio(service.server_cpu_us, floor.server_cpu_us)
                speed = ratio(service.throughput, floor.throughput)
                targeted = operation == "Authorize"
                add(
                    f"{name}: service/floor server CPU per op",
                    cpu,
                    "≤ 1.5" if targeted else "",
                    (cpu <= 1.5) if targeted and cpu else None,
                )
                add(
                    f"{name}: service/floor throughput",
                    speed,
                    "≥ 0.65" if targeted else "",
                    (speed >= 0.65) if targeted and speed else None,
                )
            if baseline is not None:
                speed = ratio(service.throughput, baseline.throughput)
                p99 = ratio(service.p99_ms, baseline.p99_ms)
                capture = operation == "Authorize+Capture"
                goal = 3.0 if workload == "uniform" else 5.0
                add(
                    f"{name}: service/baseline throughput",
                    speed,
                    f"≥ {goal:g}" if capture else "",
                    (speed >= goal) if capture and speed else None,
                )
                hot = capture and workload == "hot spot"
                add(
                    f"{name}: service/baseline p99 latency",
                    p99,
                    "≤ 0.1" if hot else "",
                    (p99 <= 0.1) if hot and p99 else None,
                )
                cpu = ratio(service.server_cpu_us, baseline.server_cpu_us)
                add(f"{name}: service/baseline server CPU per op", cpu, "", None)
            clustered = find(run, "service-cluster", operation, workload)
            if operation == "Authorize" and workload == "uniform":
                at_pace = find(run, "service", operation, PACED)
                if at_pace is not None and at_pace.pace_ops_per_s:
                    share = at_pace.pace_ops_per_s / service.throughput
                    p99 = at_pace.p99_ms / P99_AT_PACE_TARGET_MS
                    add(
                        f"Authorize paced at {share:.0%} of peak: service p99 / "
                        f"{P99_AT_PACE_TARGET_MS:g} ms",
                        p99,
                        "≤ 1",
                        p99 <= 1,
                    )
            if clustered is not None:
                for figure, label in (
                    ("throughput", "throughput"),
                    ("server_cpu_us", "server CPU per op"),
                    ("p99_ms", "p99 latency"),
                ):
                    value = ratio(getattr(clustered, figure), getattr(service, figure))
                    add(f"{name}: cluster/one node {label}", value, "", None)
    return rows  # fmt: skip


def table(run: Run) -> str:
    width = max([9, *(len(phase.system) + 1 for phase in run.phases)])
    header = (
        f"{'system':<{width}}{'operation':<18}{'workload':<10}{'ops':>8}{'errors':>8}{'ops/s':>9}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'server µs/op':>14}{'store µs/op':>13}{'over-quota':>12}"
    )
    lines = [header, "-" * len(header)]
    for phase in run.phases:
        store = f"{phase.store_cpu_us:,.0f}" if phase.store_cpu_us is not None else "-"
        over = str(phase.over_quota) if phase.over_quota is not None else "-"
        bound = "*" if phase.time_bound_hit else ""
        lines.append(
            f"{phase.system:<{width}}{phase.operation:<18}{phase.workload:<10}"
            f"{phase.operations:>7,}{bound:1}{sum(phase.errors.values()):>8,}"
            f"{phase.throughput:>9,.0f}{phase.p50_ms:>9.2f}{phase.p99_ms:>9.2f}"
            f"{phase.server_cpu_us:>14,.0f}{store:>13}{over:>12}"
        )
    if any(phase.time_bound_hit for phase in run.phases):
        lines.append("* stopped by the time bound before all operations were done")
    retried = [
        f"{phase.system} {phase.operation} {phase.workload} "
        + ", ".join(f"{code} {count:,}" for code, count in sorted(phase.retries.items()))
        for phase in run.phases
        if phase.retries
    ]
    if retried:  # not errors: each got its answer on a later try with its key
        lines.append("calls sent again with their idempotency key: " + "; ".join(retried))
    return "\n".join(lines)


def ratio_lines(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        value = "n/a" if row["value"] is None else f"{row['value']:.2f}×"
        target = f"  target {row['target']}" if row["target"] else ""
        verdict = {True: "  met", False: "  NOT met", None: ""}[row["met"]]
        lines.append(f"  {row['ratio']:<66}{value:>8}{target}{verdict}")
    return "\n".join(lines)


def chart(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(operation, workload) for operation in OPERATIONS for workload in WORKLOADS]
    systems = [s for s in SYSTEMS if any(p.system == s for p in run.phases)]
    if not systems:  # variants alone: their chart is variants.png (loadtest/variants.py)
        return
    metrics = (
        ("throughput", "operations per second (higher is better)"),
        ("server_cpu_us", "server CPU µs per operation (lower is better)"),
        ("p99_ms", "p99 latency, ms (lower is better)"),
    )
    figure, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    width = 0.8 / max(1, len(systems))
    for axis, (metric, title) in zip(axes, metrics, strict=True):
        for offset, system in enumerate(systems):
            values = []
            for operation, workload in groups:
                phase = find(run, system, operation, workload)
                values.append(getattr(phase, metric) if phase else 0)
            positions = [i + (offset - (len(systems) - 1) / 2) * width for i in range(len(groups))]
            bars = axis.bar(positions, values, width, label=system, color=COLORS[system])
            axis.bar_label(bars, fmt="%.0f" if metric != "p99_ms" else "%.1f", fontsize=7)
        axis.set_xticks(range(len(groups)))
        axis.set_xticklabels(
            [f"{o.replace('Authorize+Capture', 'Auth+Capture')}\n{w}" for o, w in groups],
            fontsize=8,
        )
        axis.set_title(title, fontsize=10)
        if metric == "p99_ms":
            axis.set_yscale("log")
    axes[0].legend()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    figure.suptitle(
        f"MedWallet AuthZ benchmark, {stamp}: {run.workers} server workers,"
        f" {os.cpu_count()} cores, {run.arguments.concurrency} calls in flight",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    run.charts.append(path.name)


def write_results(run: Run, command: str, started: datetime) -> dict[str, Any]:
    arguments = run.arguments
    rows = ratios(run)
    document = {
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": run.checks.get("load_average_at_start"),
        },
        "settings": {
            "server_workers": run.workers,
            "event_loop": arguments.event_loop,
            "load_generator_processes": arguments.clients,
            "calls_in_flight": arguments.concurrency,
            "channels_per_process": arguments.channels,
            "authorize_operations": arguments.authorize_ops,
            "authorize_capture_operations": arguments.capture_ops,
            "warmup_operations": arguments.warmup,
            "time_bound_seconds": arguments.time_bound,
            "relationships": arguments.relationships,
            "request": f"pharmacy basket, 2 eligible lines, {sum(LINE_FEN)} fen",
            "service_database": "PostgreSQL" if arguments.database_url else "SQLite",
            "baseline_database": arguments.baseline_database_url,
        },
        "phases": [asdict(phase) for phase in run.phases],
        "ratios": rows,
        "checks": run.checks,
        "notes": run.notes,
        "profiles": run.profiles,
    }
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "benchmark.json").write_text(json.dumps(document, indent=1) + "\n")
    try:
        chart(run, arguments.out / "benchmark.png")
    except ImportError as error:  # the figures count more than their picture
        log(f"no chart drawn ({error}); the figures are in benchmark.json")
    return document


def _variant(text: str) -> Any:
    """--variant's value parsed once, as argparse reads it (loadtest/variants.py imports this
    module, so it is imported here, not at the top)."""
    from loadtest.variants import parse

    try:
        return parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _phases(text: str) -> list[tuple[str, str]]:
    """--variant-phases' value: 'Authorize/uniform,Authorize+Capture/hot spot' -> pairs."""
    phases = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        operation, _, workload = item.partition("/")
        if operation not in OPERATIONS or workload not in WORKLOADS:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected OPERATION/WORKLOAD, OPERATION one of {OPERATIONS},"
                f" WORKLOAD one of {WORKLOADS}"
            )
        phases.append((operation, workload))
    if not phases:
        raise argparse.ArgumentTypeError("no phase named")
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--database-url", help="the service's SQL (default: SQLite in the run)")
    parser.add_argument("--baseline-database-url", default=DEFAULT_BASELINE_URL)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--relationships", type=int, default=20_000)
    parser.add_argument(
        "--workers", type=int, default=0, help="server processes (default: the service's)"
    )
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight, in all")
    parser.add_argument("--channels", type=int, default=4, help="connections per client process")
    parser.add_argument("--authorize-ops", type=int, default=20_000)
    parser.add_argument("--capture-ops", type=int, default=8_000)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--time-bound", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--profile",
        action="store_true",
        # from the environment too: the offline device bundle's run.sh passes fixed arguments
        default=os.environ.get("MEDWALLET_BENCH_PROFILE") == "1",
        help="py-spy one service worker during the uniform phases (also: environment"
        " MEDWALLET_BENCH_PROFILE=1)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the service, e.g. MEDWALLET_ACCESS_LOG=false (repeatable)",
    )
    parser.add_argument(
        "--tracing-cost",
        action="store_true",
        help="also measure Authorize with MEDWALLET_TRACING on (OTLP export) and off again",
    )
    parser.add_argument(
        "--event-loop",
        choices=event_loop.CHOICES,
        default="auto",
        help="the servers' event loop, the same for all three (default: uvloop when installed)",
    )
    parser.add_argument(
        "--systems",
        default="floor,service,baseline",
        help="which to measure, comma-separated (default: floor,service,baseline; also"
        " service-cluster: the service on a 3-primary Redis Cluster; security: Authorize with"
        " the limiter off, on, and on with TLS, alternated; variants: the --variant ones)",
    )
    parser.add_argument(
        "--paced-fraction",
        type=float,
        default=0.8,
        help="after its closed-loop phases, the service's Authorize (uniform) again, paced at"
        " this fraction of the throughput just measured, for its p99 at that load (0: not)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=_variant,
        metavar="NAME[@CHECKOUT]:[SETTING=VALUE,...]",
        help="with --systems variants: the service started this way (settings, and another"
        " checkout's code with @CHECKOUT); the variants alternated (loadtest/variants.py)",
    )
    parser.add_argument(
        "--variant-phases",
        default="Authorize/uniform",
        type=_phases,
        metavar="OPERATION/WORKLOAD,...",
        help="with --systems variants: the phases each variant runs, each round (default:"
        " Authorize/uniform; e.g. Authorize/uniform,Authorize+Capture/uniform)",
    )
    parser.add_argument(
        "--variant-repeats",
        type=int,
        default=3,
        help="rounds of the variants (default: 3); the summary is each one's median",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="also measure the service on a 3-primary + 3-replica Redis Cluster started for the"
        " run (system service-cluster), beside the service on one Redis node; with --systems"
        " variants, the variants on that cluster instead of one node",
    )
    parser.add_argument(
        "--sweep-workers",
        metavar="N,N,...",
        help="a worker sweep (loadtest/sweep.py): each system started with each of these worker"
        " counts, calls in flight and load processes scaled with it; counts above this"
        " machine's cores are skipped",
    )
    arguments = parser.parse_args(argv)
    if ("variants" in arguments.systems.split(",")) != bool(arguments.variant):
        parser.error("--systems variants and --variant go together")
    if any(setting.startswith("MEDWALLET_EVENT_LOOP=") for setting in arguments.service_env):
        parser.error("--event-loop chooses the loop, for the floor and the baseline too")
    arguments.event_loop = event_loop.resolve(arguments.event_loop)
    command = "python -m loadtest.benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    if arguments.sweep_workers:
        if arguments.workers:
            parser.error("--sweep-workers chooses the worker counts; leave out --workers")
        from loadtest import sweep

        return sweep.run_sweep(arguments, command.strip())
    # The service's own default for the ledger it gets (one worker on SQLite, one per core on
    # PostgreSQL); the floor and the baseline run as many.
    service_settings = replace(
        Settings.from_environment(), database_url=arguments.database_url or ""
    )
    workers = arguments.workers or service_settings.effective_workers
    started_at = datetime.now(UTC)
    arguments.out.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="mw-bench-"))
    run = Run(arguments, directory, workers)
    started = time.monotonic()
    redis = EmbeddedRedis(directory / "redis", persistent=False)
    try:
        prepare_data(run)
        measure_systems(run, redis)
    finally:
        redis.stop()
        if arguments.keep:
            log(f"run directory kept: {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    document = write_results(run, command.strip(), started_at)
    failed = report(run, document, started_at)
    charts = " and ".join(run.charts) or "no chart"
    print(f"run took {time.monotonic() - started:.0f}s; results in {arguments.out}/benchmark.json"
          f" and {charts}")  # fmt: skip
    return 1 if failed else 0


def measure_systems(run: Run, redis: EmbeddedRedis) -> None:
    """Measures each system --systems names (the baseline unless --no-baseline), each started
    with run.workers processes, on run's prepared data."""
    arguments = run.arguments
    run.checks["load_average_at_start"] = os.getloadavg()
    systems = set(arguments.systems.split(","))
    if arguments.redis_cluster and "variants" not in systems:
        systems |= {"service", "service-cluster"}
    if "security" in systems:  # TLS and the limiter on vs off (loadtest/security_phases.py)
        from loadtest import security_phases

        redis.start()
        security_phases.run_security(run, redis)
    if "variants" in systems:  # the --variant ones, alternated (loadtest/variants.py)
        from loadtest import variants

        if arguments.redis_cluster:  # the variants on the cluster only
            from tests.redis_cluster import running_cluster

            log("starting a Redis Cluster (3 primaries, 3 replicas) for the variants")
            with running_cluster(run.directory / "redis-cluster") as cluster:
                variants.run_variants(
                    run,
                    cluster_of(cluster),
                    arguments.variant,
                    arguments.variant_repeats,
                    phases=arguments.variant_phases,
                )
        else:
            redis.start()
            variants.run_variants(
                run,
                one_node(redis),
                arguments.variant,
                arguments.variant_repeats,
                phases=arguments.variant_phases,
            )
    if "service" in systems:
        redis.start()
        run_service(run, one_node(redis))
    if "service-cluster" in systems:
        from tests.redis_cluster import running_cluster

        log("starting a Redis Cluster (3 primaries, 3 replicas) for the service-cluster run")
        with running_cluster(run.directory / "redis-cluster") as cluster:
            run_service(run, cluster_of(cluster), "service-cluster")
    if "floor" in systems:
        run_floor(run)
    if "baseline" in systems and not arguments.no_baseline:
        run_baseline(run)


def report(run: Run, document: dict[str, Any], started_at: datetime) -> bool:
    """Prints the run's table, ratios and checks; True if a check failed (over-quota
    approvals, an inexact exhaustion, the store disagreeing with the clients)."""
    arguments = run.arguments
    print()
    print(
        f"MedWallet AuthZ benchmark {started_at:%Y-%m-%d %H:%M} UTC, {run.workers} server workers"
        f" on {arguments.event_loop},"
        f" {arguments.clients} load processes x {arguments.concurrency // arguments.clients}"
        f" calls in flight, {os.cpu_count()} cores, load average at start"
        f" {run.checks['load_average_at_start'][0]:.1f}"
    )
    print(table(run))
    captures = [
        f"{p.system} {p.workload} p50 {p.capture_p50_ms:.1f} / p99 {p.capture_p99_ms:.1f} ms"
        for p in run.phases
        if p.capture_p50_ms is not None and p.capture_p99_ms is not None
    ]
    if captures:
        print("the Capture call alone, within Authorize+Capture: " + "; ".join(captures))
    batched = [p for p in run.phases if p.sql_batches]
    if batched:
        print("SQL batches during each phase, rows per batch x batches, by writer:")
        for p in batched:
            print(f"  {p.system} {p.operation} {p.workload}: {sql_batches.line(p.sql_batches)}")
    staged = [p for p in run.phases if p.stage_ms]
    if staged:
        print(
            "where a call's time went, from the service's histograms (loadtest/stage_times.py;"
            " mean ms per call, per SQL batch, per loop probe):"
        )
        for p in staged:
            print(f"  {p.system} {p.operation} {p.workload}: {stage_times.line(p.stage_ms)}")
    threaded = [p for p in run.phases if p.thread_cpu]
    if threaded:
        print("server CPU per operation by thread (loadtest/thread_cpu.py):")
        for p in threaded:
            print(f"  {p.system} {p.operation} {p.workload}: {thread_cpu.line(p.thread_cpu)}")
    print("\nratios:")
    print(ratio_lines(document["ratios"]))
    sizes = ", ".join(
        f"{p.system} {p.response_bytes:.0f} B"
        for p in run.phases
        if p.operation == "Authorize" and p.workload == "uniform"
    )
    print(f"\nmean response size (Authorize, uniform): {sizes}")
    for name in (*SERVICES, "baseline"):
        check = run.checks.get(name)
        if check:
            print(
                f"{name} quota check: {check['families_checked']:,} families;"
                f" approved ≠ store: {check['approved_differs_from_store']};"
                f" conservation broken: {check['conservation_broken']}"
            )
    for name in (*SERVICES, "baseline"):
        check = run.checks.get(f"{name}_exhaust")
        if check:
            print(
                f"{name} exhaustion: {check['sent']:,} concurrent Authorize calls at a quota that"
                f" fits {check['fit_in_quota']}: {check['approved']} approved,"
                f" {check['declined']} declined, {check['errors']} errors"
            )
    tracing_line = tracing_cost.summary(run.checks)
    if tracing_line:
        print(tracing_line)
    over = sum(p.over_quota or 0 for p in run.phases)
    print(f"over-quota approvals: {over} (must be 0)")
    for note in run.notes:
        print(f"note: {note}")
    inexact = any(
        not check["exact"]
        for name in (*SERVICES, "baseline")
        if (check := run.checks.get(f"{name}_exhaust")) and not check["errors"]
    )
    failed = (
        over > 0
        or inexact
        or any(
            (run.checks.get(n) or {}).get("approved_differs_from_store")
            or (run.checks.get(n) or {}).get("conservation_broken")
            for n in (*SERVICES, "baseline")
        )
    )
    return bool(failed)


if __name__ == "__main__":
    raise SystemExit(main())
