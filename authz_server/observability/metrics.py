"""Every Prometheus metric of the service, defined once (README "Operating it" lists them).

gRPC metrics use go-grpc-prometheus's names and labels so existing dashboards and alerts work.
No label ever holds a person or a merchant. With PROMETHEUS_MULTIPROC_DIR set (multi-process
serving), prometheus-client writes each worker's values to files the supervisor aggregates.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

import authz_server

# The latency objective (p99 of Authorize under 50 ms) is a bucket boundary.
LATENCY_OBJECTIVE_SECONDS = 0.05
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, LATENCY_OBJECTIVE_SECONDS, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0)  # fmt: skip
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

grpc_started = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
grpc_handled = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
grpc_handling_seconds = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)

authorizations = Counter(
    "medwallet_authorizations_total",
    "Authorization decisions by purpose, decision and decline reason (NONE when approved).",
    ["purpose", "decision", "decline_reason"],
)
approved_fen = Counter(
    "medwallet_approved_amount_fen_total", "Money approved (held), in fen.", ["purpose"]
)
captured_fen = Counter(
    "medwallet_captured_amount_fen_total", "Money captured, in fen.", ["purpose"]
)
refunded_fen = Counter(
    "medwallet_refunded_amount_fen_total", "Money refunded, in fen.", ["purpose"]
)
open_holds = Gauge(
    "medwallet_open_holds",
    "Holds pending capture, void or expiry (counted by the sweeper).",
    multiprocess_mode="livemax",
)
hold_expirations = Counter(
    "medwallet_hold_expirations_total", "Holds that expired and returned to their quota."
)
captures_settled = Counter(
    "medwallet_captures_settled_total",
    "Captures stalled between their phases and holds a rebuild put back, settled as SQL says "
    "(by the sweeper, the reconcile or a till's retry), by what SQL said: captured (finished "
    "as captured), not_captured (a put-back hold open again, a claim SQL never got put back "
    "pending, a one-step payment SQL never had voided), live (a claim younger than "
    "STALE_CAPTURE_SECONDS by then, or claimed meanwhile: left to its own finish). A hold its "
    "own call finished meanwhile counts as what SQL said of it.",
    ["outcome"],
)
late_journal = Counter(
    "medwallet_authorize_late_journal_total",
    "Authorize decisions holding money the journal did not take when their call wrote them "
    "(the call answered UNAVAILABLE), submitted again in the background "
    "(service/late_journal.py), by how that ended: journaled, undone (SQL had another "
    "decision for the key), generation_changed (the rebuild dropped the hold); and, the hold "
    "left in Redis only until the till retries, it is released as abandoned, or it expires: "
    "gave_up, not_started, "
    "abandoned (the server stopped), undo_failed, failed, other_decision (a payment made whose "
    "key SQL answered under another decision).",
    ["outcome"],
)
abandoned_holds_released = Counter(
    "medwallet_abandoned_holds_released_total",
    "Holds in Redis whose Authorize never committed its journal row (nobody was told of them), "
    "released MEDWALLET_ABANDONED_HOLD_SECONDS after they were placed, their idempotency key "
    "answered DECLINED HOLD_ABANDONED in SQL (runtime/release_abandoned_holds.py); each logged.",
)
idempotent_replays = Counter(
    "medwallet_idempotent_replays_total",
    "Writes answered from their idempotency record (a client retry).",
    ["rpc"],
)
redis_script_seconds = Histogram(
    "medwallet_redis_script_seconds",
    "Latency of one Redis script call.",
    ["script"],
    buckets=FAST_BUCKETS,
)
# From the decision made to it committed (its batch gathering, then committing): the part of an
# Authorize's latency that is SQL's. Beside sql_commit_seconds (per batch), it says whether a
# slow Authorize waited for its batch to start or for the commit itself.
journal_wait_seconds = Histogram(
    "medwallet_journal_wait_seconds",
    "Time an Authorize waited for its decision to be committed to SQL (batch gathering + commit).",
    buckets=FAST_BUCKETS,
)
# How late the event loop ran a timer (probed every LOOP_LAG_PROBE_SECONDS by each worker,
# observability/loop_lag.py): how long any ready callback (a call's next step, a Redis reply)
# waits behind the others. High while CPU per call is flat: the worker is saturated.
event_loop_lag_seconds = Histogram(
    "medwallet_event_loop_lag_seconds",
    "How late the event loop ran a timer: the wait of a ready callback behind the others.",
    buckets=FAST_BUCKETS,
)
# SQLite only (storage/sql/wal_checkpointer.py): copied, busy (another checkpoint ran), not_wal
# (the file was not in WAL mode yet), failed. Steady "failed" means commits copy the log again.
sqlite_checkpoints = Counter(
    "medwallet_sqlite_checkpoints_total",
    "Checkpoints of the SQLite write-ahead log by the background thread, by result.",
    ["result"],
)
# writer: journal (Authorize decisions), captures, refunds (the group commit of refunds and
# other ledger writes), audit. Per writer, so a worker sweep shows which one's batches shrink
# as the load is shared by more processes (a smaller batch costs more CPU per row).
sql_commit_seconds = Histogram(
    "medwallet_sql_commit_seconds",
    "Latency of one batched SQL transaction, by writer.",
    ["writer"],
    buckets=FAST_BUCKETS,
)
group_commit_batch_size = Histogram(
    "medwallet_group_commit_batch_size",
    "Rows or units of work per batched SQL transaction, by writer.",
    ["writer"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
journal_rejected = Counter(
    "medwallet_journal_rejected_total",
    "Decisions not journaled to SQL (queue full, or a row SQL refuses on its own); each logged.",
)
reconcile_drift = Counter(
    "medwallet_reconcile_drift_total", "Quotas reconcile found different from the ledger."
)
reconcile_drift_fen = Counter(
    "medwallet_reconcile_drift_fen_total", "Absolute difference reconcile corrected, in fen."
)
reconcile_quotas = Counter(
    "medwallet_reconcile_quotas_total",
    "Quotas the rolling reconcile set from the ledger (runtime/rolling_reconcile.py): it moves "
    "at MEDWALLET_RECONCILE_QUOTAS_PER_SECOND while the deployment serves.",
)
reconcile_pages = Counter(
    "medwallet_reconcile_pages_total",
    "Pages the rolling reconcile ran on this server (empty ones too): with the pace above 0, "
    "one every 50 / pace seconds across the deployment (MedWalletRollingReconcileStalled).",
)
reconcile_pace = Gauge(
    "medwallet_reconcile_quotas_per_second",
    "The rolling reconcile's pace on this server (MEDWALLET_RECONCILE_QUOTAS_PER_SECOND on the "
    "worker that runs it; 0: off).",
    multiprocess_mode="max",
)
reconcile_failures = Counter(
    "medwallet_reconcile_failures_total",
    "Quotas a page of the rolling reconcile could not set (a Redis call failed even when tried "
    "again): the next pass tries them.",
)
hot_state_ready = Gauge(
    "medwallet_hot_state_ready",
    "1 while Redis holds a complete hot state this server trusts, else 0 (runtime/hot_state.py).",
    multiprocess_mode="livemin",
)
hot_state_rebuilds = Counter(
    "medwallet_hot_state_rebuilds_total",
    "Rebuilds of the hot state from SQL this server began (Redis lost data, restarted or "
    "failed over), those abandoned or failed included (a late page, another server's takeover).",
)
hot_state_rebuild_seconds = Gauge(
    "medwallet_hot_state_rebuild_seconds",
    "How long this server's last rebuild of the hot state from SQL took.",
    multiprocess_mode="max",
)
hot_state_rebuild_beneficiaries = Gauge(
    "medwallet_hot_state_rebuild_beneficiaries",
    "How far the rebuild of the hot state from SQL running on (or last run by) this server has "
    "got: state=done, beneficiaries written; state=total, those with a relationship when it "
    "began (runtime/rebuild_progress.py).",
    ["state"],
    multiprocess_mode="livemostrecent",
)
ledger_limit_refusals = Counter(
    "medwallet_ledger_limit_refusals_total",
    "Captures and releases Redis approved that the SQL ledger refused because the quota had"
    " not that much unused (Redis overstated the quota); each logged.",
    ["operation"],
)
# Both series exist from the start at 0, so the alert's increase() sees the first refusal (a
# series born at 1 shows no increase).
for _operation in ("capture", "release"):
    ledger_limit_refusals.labels(_operation)
# The kinds medwallet_sql_unavailable_total counts (storage/sql/failures.py).
SQL_FAILURE_KINDS = (
    "deadlock", "lock_timeout", "statement_timeout", "busy", "connection", "other",
)  # fmt: skip
sql_unavailable = Counter(
    "medwallet_sql_unavailable_total",
    "SQL transactions that failed with a retryable database error (the call answered"
    " UNAVAILABLE, or the work was tried again), by kind: deadlock (a writer outside the lock"
    " order), lock_timeout, statement_timeout, busy (SQLite's write lock past its busy"
    " timeout), connection, other.",
    ["kind"],
)
# Every kind's series from the start at 0, so the alert's increase() sees the first one.
for _kind in SQL_FAILURE_KINDS:
    sql_unavailable.labels(_kind)
redis_up = Gauge(
    "medwallet_redis_up", "1 while Redis answers, else 0.", multiprocess_mode="livemin"
)
health_serving = Gauge(
    "medwallet_health_serving", "1 while health is SERVING, else 0.", multiprocess_mode="livemin"
)
build_info = Gauge(
    "medwallet_build_info", "Build information.", ["version"], multiprocess_mode="livemax"
)
build_info.labels(version=authz_server.__version__).set(1)


class BatchObserver:
    """observe(size, seconds) of one writer's batches, its label children looked up once."""

    def __init__(self, writer: str) -> None:
        self.sizes = group_commit_batch_size.labels(writer)
        self.seconds = sql_commit_seconds.labels(writer)

    def __call__(self, size: int, seconds: float) -> None:
        self.sizes.observe(size)
        self.seconds.observe(seconds)


audit_records = Counter(
    "medwallet_audit_records_total", "Audit trail records written to SQL (one per call and person)."
)
audit_dropped = Counter(
    "medwallet_audit_dropped_total",
    "Audit records dropped because the buffer was full (SQL not answering for long).",
)
rate_limited = Counter(
    "medwallet_rate_limited_total",
    "Calls refused RESOURCE_EXHAUSTED by a per-principal limit (rate or calls in flight).",
    ["principal_kind"],
)
# The limiter runs before the gRPC metrics (a refused call is not in them): the time its Redis
# round trip adds to every limited call is here, not in grpc_server_handling_seconds.
rate_limit_check_seconds = Histogram(
    "medwallet_rate_limit_check_seconds",
    "Time a limited call spent asking Redis for its per-principal limits (admitted or not).",
    buckets=FAST_BUCKETS,
)
