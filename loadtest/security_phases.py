"""What TLS and the per-principal limiter cost on Authorize, measured in one run:

    python -m loadtest.benchmark --systems security --no-baseline

The service is started three ways on the same data and the same private Redis, one after the
other, each measured on Authorize (uniform workload) with the same load generator, and the three
alternated REPEATS times so drift of a shared machine falls on all of them:

  limiter-off   MEDWALLET_RATE_LIMITS=false, plaintext
  limiter-on    the limiter on (limits far above the load, so it refuses nothing: its cost is
                the Redis round trip per call and the release), plaintext
  tls           the limiter on, and TLS on the port (a certificate from `make-certs`; the load
                generator's tills still present tokens: no client certificate), gRPC's own TLS
  tls-front     the same, TLS terminated by the service's TLS front (server/tls_front.py,
                MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK=call) instead of gRPC's: what the front
                costs per call (with a client CA it also checks the client's certificate, once
                per connection: the tills keep theirs open)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

from authz_server.runtime.certificates import make_local_set
from authz_server.runtime.embedded_redis import EmbeddedRedis
from loadtest import generate_data
from loadtest.benchmark import Run, log, measure, python_command, sqlite_or_schema
from loadtest.processes import Server, free_port

REPEATS = 3
UNLIMITED = "rate=1000000,burst=1000000,in_flight=1000000"
VARIANTS: tuple[tuple[str, dict[str, str], bool], ...] = (
    ("limiter-off", {"MEDWALLET_RATE_LIMITS": "false"}, False),
    ("limiter-on", {"MEDWALLET_RATE_LIMITS": "true"}, False),
    ("tls", {"MEDWALLET_RATE_LIMITS": "true"}, True),
    (
        "tls-front",
        {"MEDWALLET_RATE_LIMITS": "true", "MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK": "call"},
        True,
    ),
)


def run_security(run: Run, redis: EmbeddedRedis) -> None:
    arguments = run.arguments
    database_url, _ = sqlite_or_schema(None, run.directory, "bench_security")
    certificates = run.directory / "certs"
    make_local_set(certificates, [])
    env = dict(
        os.environ,
        MEDWALLET_DATA_DIR=str(run.directory / "security"),
        DATABASE_URL=database_url,
        REDIS_URL=redis.url,
        MEDWALLET_TOKENS_FILE=str(run.tokens),
        MEDWALLET_GRPC_HOST="127.0.0.1",
        MEDWALLET_METRICS_PORT="0",
        MEDWALLET_WORKERS=str(run.workers),
        MEDWALLET_PHARMACY_HOLD_SECONDS="7200",
        MEDWALLET_MERCHANT_LIMIT=UNLIMITED,
        MEDWALLET_CHANNEL_LIMIT=UNLIMITED,
        MEDWALLET_EVENT_LOOP=arguments.event_loop,
    )
    env.update(setting.split("=", 1) for setting in arguments.service_env)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log(f"loading the data set into {database_url} with the bulk loader")
    generate_data.load(run.data, env=dict(env, REDIS_URL=""), batch_size=5000, stdout=sys.stderr)
    assert redis.process is not None
    redis_pid = redis.process.pid
    root = (certificates / "ca.crt").read_bytes()
    for _ in range(REPEATS):
        for name, extra, tls in VARIANTS:
            port = free_port()
            variant = dict(env, MEDWALLET_GRPC_PORT=str(port), **extra)
            if tls:
                variant["MEDWALLET_TLS_CERT_FILE"] = str(certificates / "server.crt")
                variant["MEDWALLET_TLS_KEY_FILE"] = str(certificates / "server.key")
                run.tls_roots[name] = root
            server = Server(
                name,
                python_command("authz_server.cli", "serve"),
                variant,
                run.directory / f"{name}.log",
                port,
                workers=run.workers,
                tls_root=root if tls else None,
            )
            log(f"starting the service: {name}")
            server.start()
            try:
                time.sleep(1.0)
                measure(run, name, server, "Authorize", "uniform", lambda: [redis_pid])
            finally:
                server.stop()
    run.checks["security"] = summary(run)
    for line in summary_lines(run.checks["security"]):
        print(line)


def summary(run: Run) -> dict[str, Any]:
    """Per variant: the median over its repeats of throughput, p50, p99 and server CPU per call,
    and the ratios to limiter-off."""
    figures: dict[str, Any] = {}
    for name, _, _ in VARIANTS:
        phases = [p for p in run.phases if p.system == name]
        figures[name] = {
            "ops_per_s": statistics.median(p.throughput for p in phases),
            "p50_ms": statistics.median(p.p50_ms for p in phases),
            "p99_ms": statistics.median(p.p99_ms for p in phases),
            "server_cpu_us": statistics.median(p.server_cpu_us for p in phases),
            "errors": sum(sum(p.errors.values()) for p in phases),
            "runs": [
                [
                    round(p.throughput),
                    round(p.p50_ms, 1),
                    round(p.p99_ms, 1),
                    round(p.server_cpu_us),
                ]
                for p in phases
            ],
        }
    return figures


def _run(throughput: float, p50: float, p99: float, cpu: float) -> list[float]:
    return [round(throughput), round(p50, 1), round(p99, 1), round(cpu)]


def summary_lines(figures: dict[str, Any]) -> list[str]:
    base = figures["limiter-off"]
    lines = [
        "\nAuthorize (uniform), median of the repeats: ops/s, p50 ms, p99 ms, server µs/op "
        "(each run's figures in brackets)"
    ]
    for name, values in figures.items():
        lines.append(
            f"  {name:<12} {values['ops_per_s']:8.0f} {values['p50_ms']:7.1f} "
            f"{values['p99_ms']:7.1f} {values['server_cpu_us']:7.0f}   "
            f"x{values['ops_per_s'] / base['ops_per_s']:.2f} throughput, "
            f"x{values['server_cpu_us'] / base['server_cpu_us']:.2f} CPU; errors "
            f"{values['errors']}; runs {values['runs']}"
        )
    return lines
