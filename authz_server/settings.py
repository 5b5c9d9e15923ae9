"""Every setting is an environment variable with a default; the README lists them in one table.

`Settings.from_environment()` reads them once at start-up into a frozen dataclass.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from authz_server.domain.abandoned_holds import DEFAULT_ABANDONED_HOLD_SECONDS
from authz_server.domain.relationships import DEFAULT_ALLOWED_RELATIONS
from authz_server.domain.types import Relation


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


class SettingError(ValueError):
    """A setting's environment variable holds what it may not: the message names it, what it
    may be, and what it was (medwallet-authz stops with it before anything starts)."""


# Each number's bounds (inclusive), by its environment variable: a value outside them, or not a
# number, stops the start with a SettingError naming it, rather than a server that answers every
# capture AUTHORIZATION_EXPIRED (a hold of -5 s) or a traceback about int().
NUMBER_BOUNDS: dict[str, tuple[float, float]] = {
    "MEDWALLET_GRPC_PORT": (0, 65_535),  # 0: any free port (tests)
    "MEDWALLET_METRICS_PORT": (0, 65_535),  # 0: no /metrics
    "MEDWALLET_WORKERS": (0, 1_024),  # 0: by the database (the field's comment)
    "MEDWALLET_SHUTDOWN_GRACE_SECONDS": (0, 3_600),
    "MEDWALLET_REDIS_TIMEOUT_SECONDS": (0.001, 60),
    "MEDWALLET_PHARMACY_HOLD_SECONDS": (60, 7 * 86_400),
    "MEDWALLET_MEDICAL_HOLD_SECONDS": (60, 30 * 86_400),
    # a safety factor below 1 would fund less than the average outflow it is meant to cover
    "MEDWALLET_PREPAID_SAFETY_PERCENT": (100, 1_000),
    "MEDWALLET_LIMIT_HOLD_MS": (0, 60_000),
    "MEDWALLET_RECONCILE_QUOTAS_PER_SECOND": (0, 5_000),  # rolling_reconcile's own bound
    # 0 (off) or at least 180: domain/abandoned_holds.py checks the gap
    "MEDWALLET_ABANDONED_HOLD_SECONDS": (0, 7 * 86_400),
    "MEDWALLET_AUDIT_RETENTION_DAYS": (0, 36_500),
    "MEDWALLET_MAX_REQUEST_BYTES": (1_024, 64 * 1024 * 1024),
    "MEDWALLET_MAX_METADATA_BYTES": (1_024, 1024 * 1024),
    "MEDWALLET_MAX_CALLS_PER_CONNECTION": (1, 100_000),
    "MEDWALLET_MIN_CLIENT_PING_INTERVAL_MS": (0, 3_600_000),
    "MEDWALLET_MAX_PING_STRIKES": (0, 1_000),
    "MEDWALLET_SERVER_KEEPALIVE_MS": (1_000, 86_400_000),
    "MEDWALLET_SERVER_KEEPALIVE_TIMEOUT_MS": (1_000, 3_600_000),
}


def _bounded(name: str, text: str, parse: Callable[[str], float], kind: str) -> float:
    """`text` parsed (int or float) within NUMBER_BOUNDS[name], else a SettingError."""
    low, high = NUMBER_BOUNDS[name]
    try:
        value = parse(text)
    except ValueError:
        value = math.nan  # refused below with the rest
    if not low <= value <= high:  # NaN fails both
        raise SettingError(
            f"{name} must be {kind} from {_shown(low)} to {_shown(high)}, not {text!r}"
        )
    return value


LIMIT_FIELDS = ("rate", "burst", "in_flight")


def limit_fields(text: str) -> tuple[float, int, int]:
    """A per-principal limit, "rate=200,burst=400,in_flight=100" -> (rate a second, burst, calls
    in flight; 0: no bound), or a ValueError saying what is wrong. Strict: a field misspelt
    ("inflight") or a rate that is not a finite number would be a bound silently not applied."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, equals, value = part.partition("=")
        name = name.strip()
        if not equals or name not in LIMIT_FIELDS or name in fields:
            raise ValueError(
                f"{part.strip()!r} is not one of {', '.join(LIMIT_FIELDS)} (once each)"
            )
        fields[name] = value.strip()
    if "rate" not in fields or "burst" not in fields:
        raise ValueError("rate and burst are required")
    try:
        rate = float(fields["rate"])
        burst = int(fields["burst"])
        in_flight = int(fields.get("in_flight", "0"))
    except ValueError:
        raise ValueError("rate is a number, burst and in_flight whole numbers") from None
    if not (math.isfinite(rate) and rate > 0) or burst < 1 or in_flight < 0:
        raise ValueError("a limit needs 0 < rate < inf, burst >= 1 and in_flight >= 0")
    return rate, burst, in_flight


def _limit(name: str, text: str) -> str:
    """`text` if it is a limit (limit_fields), else a SettingError naming the variable."""
    try:
        limit_fields(text)
    except ValueError as error:
        raise SettingError(
            f"{name} must be like 'rate=1000,burst=2000,in_flight=500' ({error}), not {text!r}"
        ) from None
    return text


def _shown(bound: float) -> str:
    return f"{int(bound):,}" if bound == int(bound) else f"{bound:g}"


@dataclass(frozen=True)
class Settings:
    # Address the gRPC server binds: loopback by default (plaintext without TLS files); the
    # deploy files set 0.0.0.0 with TLS.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    # Port of the Prometheus /metrics HTTP endpoint (0 turns it off).
    metrics_port: int = 9464
    # Where the SQLite file, the private Redis and the demo tokens live.
    data_dir: Path = Path("data")
    # SQLAlchemy URL of the system of record; empty means SQLite in data_dir.
    database_url: str = ""
    # Redis URL of the hot state: redis://host:port/db or unix:///path for one node,
    # redis+cluster://host:port,host:port,... for a Redis Cluster (seed nodes: any of its
    # nodes; the rest are found from them; runtime/wiring.py chooses the client by it); empty
    # means start a private redis-server in data_dir.
    redis_url: str = ""
    # JSON file mapping bearer token -> principal; empty means data_dir/tokens.json.
    tokens_file: str = ""
    # Server processes sharing the port (SO_REUSEPORT); 0 means one per core on PostgreSQL and
    # one on SQLite: SQLite has one writer, and two processes take turns on its file lock
    # through its sleeping busy handler (measured here: Capture p99 ~390 ms with 2 workers,
    # ~95 ms with 1, at the same throughput; loadtest/RESULTS.md).
    workers: int = 0
    # The servers' asyncio event loop: auto (uvloop when installed, else asyncio), asyncio
    # or uvloop (runtime/event_loop.py). uvloop spends less CPU per callback and socket event.
    event_loop: str = "auto"
    # Where each worker writes its decision journal and audit trail to SQL: thread (a SQL
    # thread of the worker) or process (a ledger writer process of its own, authz_server/
    # ledger/: the worker's GIL is then spent on calls; measured in loadtest/RESULTS.md).
    ledger_writer: str = "thread"
    # One JSON log line per call (request id, RPC, merchant, decision, latency).
    access_log: bool = True
    # gRPC metrics and access logs (off only to measure what they cost).
    instrumentation: bool = True
    # OpenTelemetry traces: a span per call continuing the caller's W3C traceparent, with
    # Redis script and SQL batch spans, and the trace id in the access log (off: no spans).
    tracing: bool = False
    # Where spans go over OTLP/gRPC when tracing is on (e.g. http://localhost:4317); empty
    # means spans are made (trace ids in logs, traces continued) but not exported.
    otlp_endpoint: str = ""
    # On SIGTERM: how long in-flight calls may take before the process exits.
    shutdown_grace_seconds: float = 10.0
    # Python logging level of the JSON log lines.
    log_level: str = "INFO"
    # Load demo participants, merchants, items and tokens at start (for trying it out).
    demo_data: bool = False
    # Every Redis call gives up after this long: UNAVAILABLE instead of a hang.
    redis_timeout_seconds: float = 0.5
    # How long an authorization hold lasts before it returns to the quota by itself.
    pharmacy_hold_seconds: int = 900
    medical_hold_seconds: int = 86_400
    # Prepaid fund for next month = average outflow of the last 3 closed months x this / 100.
    prepaid_safety_percent: int = 120
    # Relation kinds allowed for sharing (comma-separated), default the notice's list.
    allowed_relations: frozenset[Relation] = field(default=DEFAULT_ALLOWED_RELATIONS)
    # TLS on the gRPC port: PEM certificate (chain) and key files; empty: plaintext. Reloaded
    # when they change on disk (server/tls.py).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # PEM CA(s) whose client certificates are accepted: set, mutual TLS is required, and a
    # merchant is identified by its certificate (merchant tokens are refused).
    tls_client_ca_file: str = ""
    # Who terminates TLS and judges client certificates: call (the service's own TLS front,
    # server/tls_front.py: a missing, unknown-CA or expired client certificate gets every call
    # answered UNAUTHENTICATED with the reason) or handshake (gRPC's own TLS: such a client is
    # refused in the handshake and sees UNAVAILABLE; cheaper per byte). Empty: call with a
    # client CA, handshake without.
    tls_client_certificate_check: str = ""
    # Where a client certificate names its merchant as medwallet:merchant:<id>: uri_san or
    # common_name.
    client_identity_field: str = "uri_san"
    # Limits per principal (server/limits.py), shared by all workers and pods through Redis:
    # off only to measure what they cost.
    rate_limits: bool = True
    # Each merchant's and each channel's default: calls per second, burst, calls in flight.
    merchant_limit: str = "rate=1000,burst=2000,in_flight=500"
    channel_limit: str = "rate=5000,burst=10000,in_flight=2000"
    # JSON file of limits of their own: {"merchant:M1": "rate=50,burst=100,in_flight=20"};
    # empty: every principal has its kind's default.
    limits_file: str = ""
    # A refused call is answered after being held this long at most (within its retry delay
    # and its deadline; the RetryInfo delay shortened by as much): a till retrying in a tight
    # loop then sends a few calls a second instead of hundreds. 0: answered at once.
    limit_hold_ms: int = 100
    # The rolling reconcile's pace: while serving, the servers take turns at setting the next
    # page of 50 quotas in Redis from SQL, as the reconcile at start-up does, counting what
    # differed as drift (runtime/rolling_reconcile.py): a full pass over Q quotas takes
    # Q / this seconds (1,000,000 quotas: ~83 min at 200), one page every 50 / this seconds,
    # ~170 µs a quota of one server (loadtest/RESULTS.md, "A rolling reconcile"). Up to 5,000;
    # 0: only at start-up and by command.
    reconcile_quotas_per_second: float = 200.0
    # A hold in Redis whose Authorize never committed its journal row (its process died, or
    # its Redis reply timed out after the script ran, and the till gave up) is released once
    # it is this old, by the rolling reconcile's pages (runtime/release_abandoned_holds.py):
    # SQL gets a DECLINED row under its idempotency key first, so a late retry is told so.
    # At least 180 (domain/abandoned_holds.py: the late journal's minute, with a margin);
    # 0: none released (the rolling reconcile runs on without this step).
    abandoned_hold_seconds: int = DEFAULT_ABANDONED_HOLD_SECONDS
    # Audit records older than this are deleted by `medwallet-authz purge-audit`.
    audit_retention_days: int = 1095
    # Bounds at the edge (server/edge.py). Largest request body: a catalog batch of 1000 items
    # fits well inside; a larger body is RESOURCE_EXHAUSTED before it is read into memory.
    max_request_bytes: int = 4 * 1024 * 1024
    # Largest request metadata (headers); a bearer token and a trace header need ~1 KiB.
    max_metadata_bytes: int = 16 * 1024
    # Calls in flight on one connection (HTTP/2 streams); more wait in the client.
    max_calls_per_connection: int = 256
    # A client pinging more often than this without calls gets a strike (keepalive abuse).
    min_client_ping_interval_ms: int = 10_000
    # Strikes before the connection is closed (GOAWAY ENHANCE_YOUR_CALM).
    max_ping_strikes: int = 2
    # The server pings idle connections this often, and drops them after the timeout unanswered.
    server_keepalive_ms: int = 60_000
    server_keepalive_timeout_ms: int = 20_000

    @property
    def effective_workers(self) -> int:
        if self.workers:
            return self.workers
        if self.effective_database_url.startswith("sqlite"):
            return 1
        return os.cpu_count() or 1

    @property
    def effective_client_certificate_check(self) -> str:
        check = self.tls_client_certificate_check or (
            "call" if self.tls_client_ca_file else "handshake"
        )
        if check not in ("call", "handshake"):
            raise ValueError("MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK must be call or handshake")
        return check

    @property
    def ledger_writer_is_process(self) -> bool:
        """True: the ledger writer process (MEDWALLET_LEDGER_WRITER=process)."""
        if self.ledger_writer not in ("thread", "process"):
            raise ValueError("MEDWALLET_LEDGER_WRITER must be thread or process")
        return self.ledger_writer == "process"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'medwallet.sqlite3'}"

    @property
    def effective_tokens_file(self) -> Path:
        return Path(self.tokens_file) if self.tokens_file else self.data_dir / "tokens.json"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()

        def get(name: str, default: object) -> str:
            return env.get(name, str(default))

        def integer(name: str, default: int) -> int:
            return int(_bounded(name, get(name, default), int, "an integer"))

        def decimal(name: str, default: float) -> float:
            return _bounded(name, get(name, default), float, "a number")

        relations = env.get("MEDWALLET_ALLOWED_RELATIONS")
        return cls(
            grpc_host=get("MEDWALLET_GRPC_HOST", defaults.grpc_host),
            grpc_port=integer("MEDWALLET_GRPC_PORT", defaults.grpc_port),
            metrics_port=integer("MEDWALLET_METRICS_PORT", defaults.metrics_port),
            data_dir=Path(get("MEDWALLET_DATA_DIR", defaults.data_dir)),
            database_url=env.get("DATABASE_URL", ""),
            redis_url=env.get("REDIS_URL", ""),
            tokens_file=env.get("MEDWALLET_TOKENS_FILE", ""),
            workers=integer("MEDWALLET_WORKERS", defaults.workers),
            event_loop=get("MEDWALLET_EVENT_LOOP", defaults.event_loop).strip().lower(),
            ledger_writer=get("MEDWALLET_LEDGER_WRITER", defaults.ledger_writer).strip().lower(),
            shutdown_grace_seconds=decimal(
                "MEDWALLET_SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_seconds
            ),
            log_level=get("MEDWALLET_LOG_LEVEL", defaults.log_level),
            access_log=_flag(get("MEDWALLET_ACCESS_LOG", defaults.access_log)),
            instrumentation=_flag(get("MEDWALLET_INSTRUMENTATION", defaults.instrumentation)),
            tracing=_flag(get("MEDWALLET_TRACING", defaults.tracing)),
            otlp_endpoint=get("MEDWALLET_OTLP_ENDPOINT", defaults.otlp_endpoint).strip(),
            demo_data=_flag(get("MEDWALLET_DEMO_DATA", defaults.demo_data)),
            redis_timeout_seconds=decimal(
                "MEDWALLET_REDIS_TIMEOUT_SECONDS", defaults.redis_timeout_seconds
            ),
            pharmacy_hold_seconds=integer(
                "MEDWALLET_PHARMACY_HOLD_SECONDS", defaults.pharmacy_hold_seconds
            ),
            medical_hold_seconds=integer(
                "MEDWALLET_MEDICAL_HOLD_SECONDS", defaults.medical_hold_seconds
            ),
            prepaid_safety_percent=integer(
                "MEDWALLET_PREPAID_SAFETY_PERCENT", defaults.prepaid_safety_percent
            ),
            allowed_relations=(
                frozenset(Relation(r.strip().upper()) for r in relations.split(",") if r.strip())
                if relations
                else defaults.allowed_relations
            ),
            tls_cert_file=env.get("MEDWALLET_TLS_CERT_FILE", ""),
            tls_key_file=env.get("MEDWALLET_TLS_KEY_FILE", ""),
            tls_client_ca_file=env.get("MEDWALLET_TLS_CLIENT_CA_FILE", ""),
            tls_client_certificate_check=env.get("MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK", "")
            .strip()
            .lower(),
            client_identity_field=get(
                "MEDWALLET_CLIENT_IDENTITY_FIELD", defaults.client_identity_field
            ),
            rate_limits=_flag(get("MEDWALLET_RATE_LIMITS", defaults.rate_limits)),
            merchant_limit=_limit(
                "MEDWALLET_MERCHANT_LIMIT", get("MEDWALLET_MERCHANT_LIMIT", defaults.merchant_limit)
            ),
            channel_limit=_limit(
                "MEDWALLET_CHANNEL_LIMIT", get("MEDWALLET_CHANNEL_LIMIT", defaults.channel_limit)
            ),
            limits_file=env.get("MEDWALLET_LIMITS_FILE", ""),
            limit_hold_ms=integer("MEDWALLET_LIMIT_HOLD_MS", defaults.limit_hold_ms),
            reconcile_quotas_per_second=decimal(
                "MEDWALLET_RECONCILE_QUOTAS_PER_SECOND", defaults.reconcile_quotas_per_second
            ),
            abandoned_hold_seconds=integer(
                "MEDWALLET_ABANDONED_HOLD_SECONDS", defaults.abandoned_hold_seconds
            ),
            audit_retention_days=integer(
                "MEDWALLET_AUDIT_RETENTION_DAYS", defaults.audit_retention_days
            ),
            max_request_bytes=integer("MEDWALLET_MAX_REQUEST_BYTES", defaults.max_request_bytes),
            max_metadata_bytes=integer("MEDWALLET_MAX_METADATA_BYTES", defaults.max_metadata_bytes),
            max_calls_per_connection=integer(
                "MEDWALLET_MAX_CALLS_PER_CONNECTION", defaults.max_calls_per_connection
            ),
            min_client_ping_interval_ms=integer(
                "MEDWALLET_MIN_CLIENT_PING_INTERVAL_MS", defaults.min_client_ping_interval_ms
            ),
            max_ping_strikes=integer("MEDWALLET_MAX_PING_STRIKES", defaults.max_ping_strikes),
            server_keepalive_ms=integer(
                "MEDWALLET_SERVER_KEEPALIVE_MS", defaults.server_keepalive_ms
            ),
            server_keepalive_timeout_ms=integer(
                "MEDWALLET_SERVER_KEEPALIVE_TIMEOUT_MS", defaults.server_keepalive_timeout_ms
            ),
        )
