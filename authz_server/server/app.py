"""Assembles the gRPC server: services, handlers, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from sqlalchemy import text

from authz_server.domain.abandoned_holds import checked_abandoned_hold_seconds
from authz_server.generated.medwallet.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    authorization_pb2,
    authorization_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    relationship_pb2,
    relationship_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
)
from authz_server.ledger.client import (
    LedgerClient,
    RemoteAudit,
    RemoteJournal,
    WriterCommand,
    socket_path,
)
from authz_server.observability import loop_lag, metrics, tracing
from authz_server.observability.interceptor import ObservedServer
from authz_server.runtime.reconcile import ReconcileReport, reconcile, reconcile_page
from authz_server.runtime.reconcile_dissolved import reconcile_dissolved_page
from authz_server.runtime.release_abandoned_holds import release_abandoned_holds
from authz_server.runtime.rolling_reconcile import checked_pace, reconcile_rolling
from authz_server.runtime.wiring import open_storage
from authz_server.server.audit import AuditedServer
from authz_server.server.audit_handler import AuditHandler
from authz_server.server.auth import Authenticator, ClientIdentity
from authz_server.server.authorization_handler import AuthorizationHandler, authorize_response
from authz_server.server.edge import EdgeServer, server_options
from authz_server.server.limits import LimitedServer, Limiter, Limits
from authz_server.server.registry_handler import RegistryHandler
from authz_server.server.relationship_handler import RelationshipHandler
from authz_server.server.settlement_handler import SettlementHandler
from authz_server.server.tls import ClientIdentity as GrpcClientIdentity
from authz_server.server.tls import ReloadingCertificates
from authz_server.server.tls_front import PRIVATE_HOST, FrontGate, TlsFront
from authz_server.service import capture_recovery
from authz_server.service.audit_trail import AuditTrail
from authz_server.service.authorization import AuthorizationService
from authz_server.service.clock import Clock, system_clock
from authz_server.service.journal import Journal
from authz_server.service.reference_cache import ReferenceCache
from authz_server.service.registry import RegistryService
from authz_server.service.relationships import RelationshipService
from authz_server.service.settlement import SettlementService
from authz_server.settings import Settings
from authz_server.storage.redis.generation import published_generation
from authz_server.storage.redis.rate_limiter import RedisRateLimiter
from authz_server.storage.redis.sweeper import HoldSweeper
from authz_server.storage.redis.unconfirmed_holds import UnconfirmedHolds
from authz_server.storage.sql.group_commit import GroupCommit
from authz_server.storage.sql.refund_locks import lock_refund_quotas

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    settlement_pb2.DESCRIPTOR.services_by_name["SettlementService"].full_name,
    authorization_pb2.DESCRIPTOR.services_by_name["AuthorizationService"].full_name,
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
    relationship_pb2.DESCRIPTOR.services_by_name["RelationshipService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
]
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# How often expired holds are swept (scripts also expire due holds of their slot lazily).
SWEEP_INTERVAL_SECONDS = 1.0
# How often health looks at Redis and SQL.
HEALTH_INTERVAL_SECONDS = 1.0
# How long a starting server waits for a trustworthy hot state (its rebuild, or another's)
# before it starts anyway, NOT_SERVING, and goes on waiting in the background.
START_WAIT_SECONDS = 60.0
# Bounds on the stop sequence (Application.stop). Each step gets its own; a step that overruns
# it is logged (WARNING, naming the step) and abandoned, and the stop goes on, so the journal's
# last flush and closing SQL happen even when an earlier step hangs. grpc.aio's server.stop
# has no bound of its own: after the grace it cancels the calls left and then waits, as long
# as it takes, for the core to report every call and its own serving loop finished.
STOP_STEP_SECONDS = 5.0
# server.stop: the grace, then this long for the calls cancelled at its end to finish.
SERVER_STOP_MARGIN_SECONDS = 5.0


@dataclass
class Application:
    settings: Settings
    redis_url: str
    clock: Clock = system_clock
    # With several workers the supervisor reconciles once before starting them, and one worker
    # sweeps expired holds for all (each would otherwise scan every slot).
    reconcile_at_start: bool = True
    sweep_holds: bool = True
    server: grpc.aio.Server = field(init=False)
    port: int = field(init=False, default=0)
    # the gRPC server's loopback port behind the TLS front (0: no front)
    private_port: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        # SQL, the hot state's Redis client (one node or a cluster, by the URL), its generation,
        # the quota cache, the hold store and the guardian: wired in one place for every
        # process (runtime/wiring.py). The attributes below are the same objects, by name.
        self.storage = open_storage(
            self.settings,
            self.redis_url,
            clock=self.clock,
            on_ready=lambda _ready: self._refresh_serving(),
        )
        self.database = self.storage.database
        # The hot path (Authorize, Capture, Void, Get, quota scripts, the sweeper, health and
        # the guardian): one auto-pipelining client for the whole process.
        self.pipelined_redis = self.storage.redis
        self.generation = self.storage.generation
        self.quotas = self.storage.quotas
        self.holds = self.storage.holds
        self.guardian = self.storage.guardian
        self.certificates = (
            ReloadingCertificates(
                Path(self.settings.tls_cert_file),
                Path(self.settings.tls_key_file),
                Path(self.settings.tls_client_ca_file)
                if self.settings.tls_client_ca_file
                else None,
            )
            if self.settings.tls_cert_file
            else None
        )
        mutual_tls = self.certificates is not None and self.certificates.client_ca_file is not None
        # MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK=call: the service's own TLS front on the port,
        # the gRPC server on a private loopback port behind it (server/tls_front.py).
        self.front = (
            TlsFront(self.certificates, self.settings.client_identity_field)
            if self.certificates is not None
            and self.settings.effective_client_certificate_check == "call"
            else None
        )
        identity: ClientIdentity | None = None
        if self.front is not None:
            identity = self.front.identity
        elif mutual_tls:
            identity = GrpcClientIdentity(self.settings.client_identity_field)
        self.auth = Authenticator.from_file(self.settings.effective_tokens_file, identity)
        self.references = ReferenceCache(self.database)
        self.registry = RegistryService(self.database, self.quotas, self.clock, self.references)
        self.relationships = RelationshipService(
            self.database, self.quotas, self.settings.allowed_relations, self.clock
        )
        self.group_commit = GroupCommit(
            self.database, metrics.BatchObserver("refunds"), lock_first=lock_refund_quotas
        )
        self.ledger: LedgerClient | None = None
        self.journal: Journal | RemoteJournal
        self.audit: AuditTrail | RemoteAudit
        if self.settings.ledger_writer_is_process:
            self.ledger = LedgerClient(
                WriterCommand(
                    socket=socket_path(self.settings.data_dir),
                    database_url=self.settings.effective_database_url,
                    redis_url=self.redis_url,
                    redis_timeout_seconds=self.settings.redis_timeout_seconds,
                    log_level=self.settings.log_level,
                    event_loop=self.settings.event_loop,
                )
            )
            self.journal, self.audit = self.ledger.journal, self.ledger.audit
        else:
            self.journal = Journal(
                self.database, functools.partial(published_generation, self.pipelined_redis)
            )
            self.audit = AuditTrail(self.database)
        self.authorizations = AuthorizationService(
            self.database,
            self.holds,
            self.quotas,
            self.group_commit,
            self.journal,
            self.references,
            self.settings.pharmacy_hold_seconds,
            self.settings.medical_hold_seconds,
            self.clock,
        )
        self.settlement = SettlementService(
            self.database, self.settings.prepaid_safety_percent, self.clock
        )
        self.limiter = (
            Limiter(
                self.auth,
                Limits.from_settings(
                    self.settings.merchant_limit,
                    self.settings.channel_limit,
                    self.settings.limits_file,
                ),
                RedisRateLimiter(self.pipelined_redis),
                hold_seconds=self.settings.limit_hold_ms / 1000,
            )
            if self.settings.rate_limits
            else None
        )
        self.health = health_aio.HealthServicer()
        self.background: list[asyncio.Task[None]] = []
        self.stopping = False
        # SERVING while Redis and SQL answer and the hot state is trusted (both known).
        self.dependencies_answer = True
        self.serving = False

    async def start(self) -> int:
        """Binds, reconciles Redis from SQL, then reports SERVING. Returns the bound port."""
        self.database.start_checkpoints()
        server = grpc.aio.server(
            options=server_options(self.settings, reuse_port=self.front is None)
        )
        # Metrics and the access log: every unary handler is wrapped as it is added (cheaper
        # than a grpc.aio interceptor, which costs ~30 µs a call by itself).
        traced = tracing.configure(self.settings.tracing, self.settings.otlp_endpoint)
        # Each layer wraps the server made before it, and a call meets them in the order they
        # are made here. First the per-principal limits: a refused call reaches neither the
        # metrics and the access log (medwallet_rate_limited_total counts it) nor the trail,
        # and does not count in the error ratio (a flooding till is
        # MedWalletPrincipalRateLimited's, not the service's failure).
        limited = LimitedServer(server, self.limiter) if self.limiter is not None else server
        observed = (
            ObservedServer(limited, self.settings.access_log, traced)
            if self.settings.instrumentation
            else limited
        )
        # Behind the TLS front, a call on a connection it refused (or does not know) is answered
        # UNAUTHENTICATED whatever its method, observed as such.
        if self.front is not None:
            observed = FrontGate(observed, self.front.peers)
        # Then the audit trail records calls about persons; last, a body that does not parse is
        # INVALID_ARGUMENT (observed as such, and not audited: it read nothing).
        audited = AuditedServer(observed, self.audit)
        self.server = EdgeServer(audited)
        # First: a call's method is looked up in the services in the order they are added
        # (server/wrapped_server.py), and the tills' payments are most of the calls.
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(
            AuthorizationHandler(self.authorizations, self.auth), self.server
        )
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(
            RegistryHandler(self.registry, self.auth), self.server
        )
        relationship_pb2_grpc.add_RelationshipServiceServicer_to_server(
            RelationshipHandler(self.relationships, self.auth), self.server
        )
        settlement_pb2_grpc.add_SettlementServiceServicer_to_server(
            SettlementHandler(self.settlement, self.auth), self.server
        )
        audit_pb2_grpc.add_AuditServiceServicer_to_server(
            AuditHandler(self.database, self.auth), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self.server,
        )  # fmt: skip
        await self._set_serving(False)
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        try:
            if self.front is not None:  # never another address than loopback, plaintext
                self.private_port = self.server.add_insecure_port(f"{PRIVATE_HOST}:0")
            elif self.certificates is not None:
                credentials = self.certificates.server_credentials()
                self.port = self.server.add_secure_port(address, credentials)
            else:
                if self.settings.grpc_host not in LOOPBACK:
                    log.warning(
                        "plaintext gRPC on %s: set MEDWALLET_TLS_CERT_FILE/KEY_FILE", address
                    )
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as error:  # gRPC says only "Failed to bind to address ..."
            raise RuntimeError(
                f"cannot listen on gRPC port {self.settings.grpc_port} ({address}): in use by"
                " another process, or not an address of this machine"
            ) from error
        await self.storage.preload_scripts()
        await self.references.refresh()
        self.references.start()
        self.group_commit.start()
        self.journal.start()
        self.audit.start()
        # A Redis that lost its data (or never had any) is rebuilt from SQL first: by this
        # server, or by another that got there first.
        ready = await self.guardian.wait_ready(START_WAIT_SECONDS)
        if self.reconcile_at_start and ready and self.guardian.last_rebuild is None:
            report = await reconcile(self.database, self.quotas, self.holds, self.clock)
            record_reconcile(report)
        loop = asyncio.get_running_loop()
        if self.sweep_holds:
            self.background.append(loop.create_task(self._sweep(), name="hold-sweeper"))
        pace = checked_pace(self.settings.reconcile_quotas_per_second)  # a bad one: no start
        grace_seconds = checked_abandoned_hold_seconds(self.settings.abandoned_hold_seconds)
        if self.sweep_holds and pace > 0:
            metrics.reconcile_pace.set(pace)
            unconfirmed = UnconfirmedHolds(self.pipelined_redis)
            rolling = reconcile_rolling(
                pace,
                self.pipelined_redis,
                lambda: self.guardian.ready and not self.stopping,
                lambda after, page_size: reconcile_page(
                    self.database,
                    self.quotas,
                    after,
                    page_size,
                    rolling=True,
                    holds=self.holds,
                    clock=self.clock,
                ),
                lambda after, page_size: reconcile_dissolved_page(
                    self.database, self.quotas, after, page_size, self.clock
                ),
                (
                    lambda after, through: release_abandoned_holds(
                        self.database,
                        unconfirmed,
                        after,
                        through,
                        grace_seconds,
                        authorize_response,
                        self.clock,
                    )
                )
                if grace_seconds
                else None,
            )
            self.background.append(loop.create_task(rolling, name="rolling-reconcile"))
        await self.server.start()
        if self.front is not None:
            try:
                self.port = await self.front.start(
                    self.settings.grpc_host, self.settings.grpc_port, self.private_port
                )
            except OSError as error:
                raise RuntimeError(
                    f"cannot listen on gRPC port {self.settings.grpc_port} ({address}): {error}"
                ) from error
        await self._refresh_serving()
        self.background.append(loop.create_task(self._monitor(), name="health-monitor"))
        self.background.append(loop.create_task(loop_lag.watch(), name="event-loop-lag"))
        self.background.append(loop.create_task(self.guardian.run(), name="hot-state-guardian"))
        return self.port

    async def _monitor(self) -> None:
        """NOT_SERVING while Redis or SQL does not answer, SERVING again once both do."""
        while not self.stopping:
            await asyncio.sleep(HEALTH_INTERVAL_SECONDS)
            healthy = await self._dependencies_answer()
            if healthy != self.dependencies_answer and not self.stopping:
                log.warning("dependencies %s", "answer again" if healthy else "do not answer")
            self.dependencies_answer = healthy
            await self._refresh_serving()

    async def _refresh_serving(self) -> None:
        """Health as the dependencies and the hot state say (never SERVING once stopping)."""
        serving = self.dependencies_answer and self.guardian.ready and not self.stopping
        if serving != self.serving and not self.stopping:
            self.serving = serving
            await self._set_serving(serving)

    async def _dependencies_answer(self) -> bool:
        try:
            await asyncio.wait_for(self._ping_redis(), self.settings.redis_timeout_seconds * 2)
            metrics.redis_up.set(1)
        except Exception:
            metrics.redis_up.set(0)
            return False
        try:
            await asyncio.wait_for(
                self.database.run(lambda session: session.execute(text("SELECT 1"))), 5
            )
        except Exception:
            return False
        return True

    async def _ping_redis(self) -> None:
        """PING on every primary: on a cluster, any shard down is a Redis that does not answer
        (its beneficiaries could not pay)."""
        primaries = await self.pipelined_redis.primaries()
        await asyncio.gather(*(primary.execute("PING") for primary in primaries))

    async def _set_serving(self, serving: bool) -> None:
        metrics.health_serving.set(1 if serving else 0)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *SERVICE_NAMES]:
            await self.health.set(name, status)

    async def _sweep(self) -> None:
        """Returns expired holds to their quotas even when nobody touches them, and settles
        captures stalled between their phases as SQL says. Costs what is due (HoldSweeper)."""
        sweeper = HoldSweeper(self.storage.sweeps, SWEEP_INTERVAL_SECONDS)
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)
            try:
                now_ms = int(self.clock().timestamp() * 1000)
                report = await sweeper.sweep(now_ms)
                metrics.hold_expirations.inc(report.expired)
                if report.open_holds is not None:  # counted by a complete safety-net pass
                    metrics.open_holds.set(report.open_holds)
                await sweeper.settle_due(
                    now_ms,
                    report.stalled_captures,
                    lambda stalled, due_ms: capture_recovery.settle_stalled(
                        self.database, self.holds, stalled, due_ms
                    ),
                )
            except Exception:
                log.exception("hold sweep failed; retrying")

    async def stop(self, grace_seconds: float | None = None) -> list[str]:
        """NOT_SERVING first, so balancers stop sending; then in-flight calls get the grace.
        Every step is bounded (STOP_STEP_SECONDS; server.stop: the grace plus
        SERVER_STOP_MARGIN_SECONDS). Returns the steps that overran or failed: empty, a clean
        stop."""
        self.stopping = True
        self.guardian.stop()
        step = STOP_STEP_SECONDS
        redis_step = max(step, self.settings.redis_timeout_seconds * 4)  # aclose waits 2x
        steps: list[tuple[str, Callable[[], Awaitable[object]], float]] = [
            ("health_not_serving", lambda: self._set_serving(False), step),
            ("tls_front_stop_accepting", self._front_stop_accepting, step),
            (
                "server_stop",
                lambda: self.server.stop(grace_seconds),
                (grace_seconds or 0.0) + SERVER_STOP_MARGIN_SECONDS,
            ),
            # after the grace: the connections left (the gRPC server closed its side already)
            ("tls_front_close", self._front_close, step),
            ("background_tasks", self._stop_background, step),
            # captures and releases whose calls were cancelled (a deadline) but which run to
            # their end: before Redis and SQL close
            ("writes_left_running", self._writes_left_running, step),
            ("capture_writer", self.authorizations.captures.writer.written, step),
            # rows waiting for a retry are given up on (logged) before the journal writes
            # what is queued and stops
            ("late_journal", self.authorizations.late_journal.stop, step),
            ("journal", self.journal.stop, step),
            ("audit_trail", self.audit.stop, step),
            ("limiter_releases", self._stop_limiter, step),
            ("group_commit", self.group_commit.stop, step),
            ("reference_cache", self.references.stop, step),
            ("pipelined_redis", self.pipelined_redis.aclose, redis_step),
            # Database.close joins the SQL threads: on a thread of its own, not on the loop.
            ("sql", lambda: in_own_thread(self.database.close, "sql-close"), step),
        ]
        unfinished = []
        for name, run, seconds in steps:
            if not await bounded_step(name, run, seconds):
                unfinished.append(name)
        return unfinished

    async def _front_stop_accepting(self) -> None:
        if self.front is not None:
            self.front.stop_accepting()

    async def _front_close(self) -> None:
        if self.front is not None:
            await self.front.close()

    async def _stop_limiter(self) -> None:
        if self.limiter is not None:
            await self.limiter.stop()

    async def _writes_left_running(self) -> None:
        await asyncio.gather(
            self.authorizations.to_the_end.finished(),
            self.relationships.to_the_end.finished(),
            self.registry.to_the_end.finished(),
        )

    async def _stop_background(self) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)


async def bounded_step(name: str, step: Callable[[], Awaitable[object]], seconds: float) -> bool:
    """Runs one step of a stop sequence for at most `seconds`. True: it finished. False: it
    overran its bound (a WARNING naming it; the step is cancelled and not waited for, so even
    one that ignores cancellation cannot hold the stop) or it raised (an ERROR naming it)."""
    started = asyncio.get_running_loop().time()
    bound = asyncio.timeout(seconds)
    task: asyncio.Future[object] | None = None
    try:
        task = asyncio.ensure_future(step())
        task.add_done_callback(_retrieve_outcome)
        async with bound:
            # Shielded: the bound ends the wait at once, whatever the step does when cancelled.
            await asyncio.shield(task)
    except asyncio.CancelledError:  # the stop itself was cancelled: so is its step
        if task is not None:
            task.cancel()
        raise
    except Exception:
        if bound.expired() and task is not None:
            task.cancel()
            log.warning(
                "stop step %s did not finish within %.1f s; going on",
                name,
                seconds,
                extra={"step": name, "bound_seconds": seconds},
            )
        else:
            log.exception("stop step %s failed; going on", name, extra={"step": name})
        return False
    log.debug(
        "stop step %s done",
        name,
        extra={"step": name, "seconds": round(asyncio.get_running_loop().time() - started, 3)},
    )
    return True


def _retrieve_outcome(task: asyncio.Future[object]) -> None:
    # An abandoned step that fails later: retrieved here, not reported again at collection.
    if not task.cancelled():
        task.exception()


async def in_own_thread(function: Callable[[], object], name: str) -> None:
    """Runs a blocking call on a daemon thread of its own and waits for it. A bound can give up
    on it: on the loop it would block the loop (and every bound with it), and a thread of the
    loop's default executor is joined when the loop closes."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: Exception | None) -> None:
        if done.done():  # the waiter gave up
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: Exception | None = None
        try:
            function()
        except Exception as caught:
            error = caught
        # RuntimeError: the loop closed meanwhile, nobody waits for it any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done


def record_reconcile(report: ReconcileReport) -> None:
    metrics.reconcile_drift.inc(report.drifted)
    metrics.reconcile_drift_fen.inc(report.drift_fen)
    log.log(
        logging.WARNING if report.drifted else logging.INFO,
        "reconciled %d quotas, %d drifted by %d fen (%d overstated by Redis), %d left as they"
        " were (a capture between its phases, or money moving as they were set); holds Redis"
        " had wrong: %d put back, %d voided",
        report.quotas,
        report.drifted,
        report.drift_fen,
        report.overstated,
        report.busy,
        report.holds_put_back,
        report.holds_voided,
    )
