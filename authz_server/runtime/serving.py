"""`medwallet-authz serve`: one process, or a supervisor with N worker processes.

With N > 1 the supervisor prepares what is shared (schema, private Redis, tokens), then spawns
N workers that each create their own gRPC server on the same port (SO_REUSEPORT) — spawned, not
forked, so no gRPC object ever crosses a fork. Workers write metrics to PROMETHEUS_MULTIPROC_DIR;
the supervisor serves one /metrics aggregating them. SIGTERM to the supervisor is passed to the
workers, which turn NOT_SERVING, finish in-flight calls within the grace period and exit 0.
Before all of it, the data directory and the ports are claimed for this server alone
(runtime/exclusive.py): no other server joins them.

Every step of a worker's stop is bounded (Application.stop); one that overran makes the exit
code 1. A signal while stopping is logged and ignored, and a watchdog bounds what comes after
the stop too (closing the loop, the interpreter's exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import threading
from types import FrameType

from authz_server.observability import logs
from authz_server.runtime import demo, event_loop, exclusive
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.runtime.rebuild import RebuildReport
from authz_server.runtime.reconcile import ReconcileReport
from authz_server.settings import Settings
from authz_server.storage.sql.migrate import upgrade_to_head

log = logging.getLogger("authz_server")

# After a worker's stop: how long closing its loop and the interpreter's exit may take before a
# watchdog ends the process (with the stop's exit code). Both join threads (the loop's default
# executor, SQL threads, at worst gRPC's poller: grpc PR #40989) that a hang elsewhere can hold.
# Container allocations between two collections of the youngest generation (Python's default
# is 700; settle_garbage_collector).
GC_YOUNG_THRESHOLD = 10_000
# The single-process server stops its private Redis within this too (up to 5 s).
EXIT_WATCHDOG_SECONDS = 15.0


def serve(settings: Settings) -> int:
    logs.configure(settings.log_level)
    # A wrong MEDWALLET_EVENT_LOOP fails here, once, not in every worker.
    log.info("event loop: %s", event_loop.resolve(settings.event_loop))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Before anything else starts: the data directory and the ports are this server's alone
    # (runtime/exclusive.py), or it exits at once saying whose they are.
    claims: list[exclusive.Claim] = []
    try:
        refuse_plaintext_with_a_client_ca(settings)
        for claim in (
            exclusive.claim_data_directory(settings.data_dir),
            exclusive.claim_port(settings.grpc_host, settings.grpc_port, "MEDWALLET_GRPC_PORT"),
            exclusive.claim_port("0.0.0.0", settings.metrics_port, "MEDWALLET_METRICS_PORT"),
        ):
            if claim is not None:
                claims.append(claim)
        return _serve_claimed(settings, claims)
    except exclusive.ServeRefused as refused:
        log.error("not serving: %s", refused)
        return 1
    finally:
        # Last: a new server may start once this one's Redis has stopped too.
        for claim in claims:
            claim.release()


def refuse_plaintext_with_a_client_ca(settings: Settings) -> None:
    """A client CA asks that every merchant present a certificate; without the server's own
    certificate and key the port would be plaintext and merchant tokens accepted: refused,
    rather than serving less securely than configured. So is a certificate without its key, or
    a key without its certificate."""
    if settings.tls_client_ca_file and not (settings.tls_cert_file and settings.tls_key_file):
        raise exclusive.ServeRefused(
            "MEDWALLET_TLS_CLIENT_CA_FILE is set but MEDWALLET_TLS_CERT_FILE and "
            "MEDWALLET_TLS_KEY_FILE are not: mutual TLS needs the server's own certificate "
            "(set both, or unset the client CA to serve without TLS)"
        )
    # One of the pair alone: TLS was meant (a misspelt or unset variable beside it); the port
    # would have been plaintext, the tokens crossing the network in clear, with at most a
    # warning (and none on a loopback address).
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        given, missing = (
            ("MEDWALLET_TLS_CERT_FILE", "MEDWALLET_TLS_KEY_FILE")
            if settings.tls_cert_file
            else ("MEDWALLET_TLS_KEY_FILE", "MEDWALLET_TLS_CERT_FILE")
        )
        raise exclusive.ServeRefused(
            f"{given} is set but {missing} is not: TLS needs both (set both, or neither to "
            "serve plaintext)"
        )


def _serve_claimed(settings: Settings, claims: list[exclusive.Claim]) -> int:
    upgrade_to_head(settings.effective_database_url)
    if settings.demo_data:
        demo.write_tokens(settings.effective_tokens_file)
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(settings.data_dir / "redis")
        redis_url = embedded.start()
    try:
        if settings.effective_workers == 1:
            if settings.metrics_port:
                from prometheus_client import start_http_server

                start_http_server(settings.metrics_port)
            return event_loop.run(run_worker(settings, redis_url, 0), settings.event_loop)
        return _supervise(settings, redis_url, claims)
    finally:
        if embedded:
            embedded.stop()


async def _reconcile_once(
    settings: Settings, redis_url: str
) -> tuple[ReconcileReport, RebuildReport | None]:
    """Before the workers start: Redis made trustworthy and reconciled once, not per worker;
    and the rebuild that took, if it ran here (worker 0 counts it in the metrics)."""
    from authz_server.runtime.hot_state import trusted_and_reconciled

    return await trusted_and_reconciled(settings, redis_url)


def _supervise(settings: Settings, redis_url: str, claims: list[exclusive.Claim]) -> int:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or str(settings.data_dir / "metrics")
    _emptied(metrics_dir)  # stale files would add old counts
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    report, rebuilt = event_loop.run(_reconcile_once(settings, redis_url), settings.event_loop)
    log.info(
        "reconciled %d quotas, %d drifted (%d overstated by Redis)",
        report.quotas,
        report.drifted,
        report.overstated,
    )
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=worker_main,
            args=(settings, redis_url, index, report, claims, rebuilt),
            name=f"w{index}",
        )
        for index in range(settings.effective_workers)
    ]
    for worker in workers:
        worker.start()
    if settings.metrics_port:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        start_http_server(settings.metrics_port, registry=registry)

    def forward(signum: int, _frame: FrameType | None) -> None:
        for worker in workers:
            if worker.pid and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("supervising %d workers", len(workers))
    codes = []
    for worker in workers:
        worker.join()
        codes.append(worker.exitcode or 0)
        from prometheus_client import multiprocess

        if worker.pid:
            multiprocess.mark_process_dead(worker.pid, metrics_dir)  # type: ignore[no-untyped-call]
    return 0 if all(code == 0 for code in codes) else 1


def _emptied(directory: str) -> None:
    """Empties the multiprocess metrics directory, made if missing. Its contents go, not the
    directory itself: it is usually a mount point (a Kubernetes emptyDir, compose's tmpfs), which
    cannot be removed, under a parent the server may not write (a read-only root filesystem)."""
    os.makedirs(directory, exist_ok=True)
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def worker_main(
    settings: Settings,
    redis_url: str,
    index: int,
    reconciled: ReconcileReport,
    claims: list[exclusive.Claim],
    rebuilt: RebuildReport | None = None,
) -> None:
    """A worker's process. `claims`: the supervisor's (the same open files), held open here until
    the process ends, so the data directory and port stay claimed while any worker serves."""
    logs.configure(settings.log_level)
    raise SystemExit(
        event_loop.run(
            run_worker(settings, redis_url, index, reconciled, rebuilt), settings.event_loop
        )
    )


async def run_worker(
    settings: Settings,
    redis_url: str,
    index: int,
    reconciled: ReconcileReport | None = None,
    rebuilt: RebuildReport | None = None,
) -> int:
    """One server process. `reconciled`: the supervisor already made Redis trustworthy and
    reconciled it (worker 0 reports its drift in the metrics, and `rebuilt`, the rebuild from
    SQL it ran, if any: MedWalletHotStateRebuilt); None: this process does it at start itself."""
    from authz_server.server.app import Application

    app = Application(
        settings, redis_url, reconcile_at_start=reconciled is None, sweep_holds=index == 0
    )
    if reconciled is not None and index == 0:
        from authz_server.server.app import record_reconcile

        record_reconcile(reconciled)
        if rebuilt is not None:
            from authz_server.observability import metrics

            metrics.hot_state_rebuilds.inc()
            metrics.hot_state_rebuild_seconds.set(rebuilt.seconds)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():  # a second SIGTERM (or Ctrl-C besides the supervisor's SIGTERM)
            log.info(
                "worker %d: signal %d while stopping, ignored (the stop is bounded)",
                index,
                signum,
                extra={"signal": signum},
            )
            return
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    port = await app.start()
    settle_garbage_collector()
    if settings.demo_data and index == 0:
        relationship_id = await demo.load(app.registry, app.relationships)
        demo.print_instructions(port, relationship_id)
    loop_name = event_loop.resolve(settings.event_loop)
    log.info("worker %d serving on port %d (event loop: %s)", index, port, loop_name)
    await stopping.wait()
    grace = settings.shutdown_grace_seconds
    log.info("worker %d stopping: NOT_SERVING, %.1f s grace", index, grace)
    unfinished = await app.stop(grace)
    code = 1 if unfinished else 0
    # Only the exit is left: a late signal is ignored rather than killing the process half-way
    # (closing the loop would put the default handlers back), and the watchdog bounds the exit.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)
    _exit_within(EXIT_WATCHDOG_SECONDS, code)
    if unfinished:
        log.warning(
            "worker %d stopped; steps not finished: %s",
            index,
            ", ".join(unfinished),
            extra={"steps": unfinished},
        )
    else:
        log.info("worker %d stopped", index)
    return code


def settle_garbage_collector() -> None:
    """Once the worker is serving: what start-up built (modules, protobuf descriptors, the
    reference data, SQLAlchemy's metadata) lives as long as the process, so it is moved out of
    the collector's sight (gc.freeze), and the youngest generation is collected every
    GC_YOUNG_THRESHOLD allocations instead of 700. A call's objects mostly die by reference
    count; the cyclic collector runs for the few cycles, and with the default threshold it ran
    every few calls, walking the objects of every call in flight each time."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _exit_within(seconds: float, code: int) -> None:
    """Ends the process with `code` if it still runs `seconds` from now (a daemon thread: a
    process that exits before then is not held by it)."""

    def expire() -> None:
        log.warning(
            "process did not exit within %.1f s of its stop; exiting now",
            seconds,
            extra={"exit_code": code},
        )
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(code)

    watchdog = threading.Timer(seconds, expire)
    watchdog.name = "exit-watchdog"
    watchdog.daemon = True
    watchdog.start()
