"""Times the way back from a Redis loss: FLUSHALL on a running server's Redis, until the server
noticed, rebuilt the hot state from SQL (runtime/rebuild.py) and serves again (issue 12).

    python -m loadtest.rebuild_benchmark [--relationships 100000] [--decisions 1000000]
        [--open-holds 20000] [--runs 3] [--database-url postgresql+psycopg://...]
        [--pages-in-flight 1,4]

1. A database migrated to head: a fresh SQLite file in a temporary directory, or with
   --database-url a private schema of that PostgreSQL database (dropped afterwards). It is filled
   with bulk INSERTs (progress bar): employee holders and beneficiaries, --relationships active
   relationships (two per beneficiary) with a QUOTA_ALLOCATION ledger row each and running
   totals that match the ledger, and --decisions rows in `authorizations` spread over the current
   month: about 8% declined, the approved ones mostly captured (captures, capture_parts and a
   CAPTURE ledger row per part), some voided, the rest expired; --open-holds of them (part of
   --decisions) still open: approved, expiring hours from now, on active quotas, within them.
2. A private redis-server and the service (Application, as tests/harness.py starts it) in this
   process, on their own event loop; the start itself rebuilds the empty Redis (not timed).
3. --runs times: FLUSHALL, then the time until the guardian trusts Redis again with a new
   rebuild: detection (the guardian's next look, ≤ 0.5 s, and the lock) and the rebuild, split
   into its phases (deleting what Redis had, SQL reads, Redis writes), and this process's CPU
   meanwhile (the service's threads; not Redis's or PostgreSQL's). With --pages-in-flight 1,4
   the runs take those values in turn (rebuild.PAGES_IN_FLIGHT: pages read and written at once)
   and each value's median is printed. A sample of quotas is then read from Redis and compared
   with what SQL says (ledger less open holds): any difference fails the run.
4. --reconciles times: a reconcile of every quota while serving (what the periodic one costs a
   server), which must find nothing to set right.
5. A summary; loadtest/results/rebuild/rebuild-<database>-<relationships>.json and .png (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, create_engine, select, text
from sqlalchemy.orm import Session

from authz_server.domain.funding import format_funding
from authz_server.domain.hot_state import expected_figures
from authz_server.domain.model import QuotaFigures
from authz_server.runtime import event_loop
from authz_server.runtime import rebuild as rebuild_module
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.runtime.progress import Progress
from authz_server.runtime.reconcile import ReconcileReport, reconcile
from authz_server.server.app import Application
from authz_server.service import capture_recovery
from authz_server.service.ports import STALE_CAPTURE_SECONDS
from authz_server.settings import Settings
from authz_server.storage.redis import keys
from authz_server.storage.sql.dbapi import BulkInsert, run_many
from authz_server.storage.sql.migrate import upgrade_to_head
from authz_server.storage.sql.open_holds import open_holds
from authz_server.storage.sql.tables import Base, RelationshipRow

T = TypeVar("T")

RESULTS = Path(__file__).resolve().parent / "results" / "rebuild"
REGIONS = ["110100", "310100", "320100", "330100", "440100", "510100", "420100", "370100"]
MERCHANTS = 200
BATCH = 20_000
# Decisions past: declined; of the approved, captured and voided (the rest expired).
DECLINED_SHARE = 0.08
CAPTURED_SHARE = 0.60
VOIDED_SHARE = 0.10
SPLIT_SHARE = 0.10  # approvals funded by both of the beneficiary's quotas
PHARMACY_HOLD = timedelta(seconds=Settings().pharmacy_hold_seconds)
MEDICAL_HOLD = timedelta(seconds=Settings().medical_hold_seconds)
ALLOCATION_FEN = 300_000  # plus up to 200,000, per relationship
HOLDER_SPARE_FEN = 1_000_000  # left on each holder's personal account
MAX_REQUEST_FEN = 20_000


# --- the data -----------------------------------------------------------------------------


@dataclass
class Population:
    """Who is in the database: relationship r funds beneficiary r // 2 (two quotas each)."""

    relationships: int
    relationship_ids: list[str]
    holders: list[str]
    beneficiaries: list[str]
    allocated: list[int]
    captured: list[int]
    held: list[int]

    def holder_of(self, r: int) -> int:
        half = max(1, len(self.holders) // 2)
        return (r // 2 + (r % 2) * half) % len(self.holders)

    def quotas_of(self, b: int) -> list[int]:
        return [r for r in (2 * b, 2 * b + 1) if r < self.relationships]


@dataclass
class FillReport:
    seconds: float
    rows: dict[str, int]


def table(name: str) -> Any:
    return Base.metadata.tables[name]


def fill(url: str, arguments: argparse.Namespace, now: datetime) -> FillReport:
    """Writes the registry, the ledger and the month's decisions (see the module's text)."""
    rng = random.Random(arguments.seed)
    count = arguments.relationships
    beneficiary_count = (count + 1) // 2
    population = Population(
        relationships=count,
        relationship_ids=[f"{rng.getrandbits(128):032x}" for _ in range(count)],
        holders=[f"bench-h{h:07d}" for h in range(max(2, count // 4))],
        beneficiaries=[f"bench-b{b:07d}" for b in range(beneficiary_count)],
        allocated=[ALLOCATION_FEN + (r * 7919) % 200_000 for r in range(count)],
        captured=[0] * count,
        held=[0] * count,
    )
    rows: dict[str, int] = {}
    engine = create_engine(url)
    started = time.perf_counter()
    total = (
        len(population.holders) + beneficiary_count + MERCHANTS + 2 * count
        + arguments.decisions + count
    )  # fmt: skip
    try:
        with Progress(total, "filling SQL", unit="rows") as progress:
            with engine.begin() as connection:
                _fast_sqlite(connection)
                _registry(connection, population, now, rows, progress)
            _decisions(engine, population, arguments, now, rng, rows, progress)
            with engine.begin() as connection:
                _fast_sqlite(connection)
                mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
                captured = [
                    (population.captured[r], population.relationship_ids[r])
                    for r in range(count)
                    if population.captured[r]
                ]
                run_many(
                    connection,
                    f"UPDATE relationships SET captured_total_fen = {mark}"
                    f" WHERE relationship_id = {mark}",
                    captured,
                )
                progress.advance(count)
                connection.execute(text("ANALYZE"))
    finally:
        engine.dispose()
    return FillReport(seconds=time.perf_counter() - started, rows=rows)


def _fast_sqlite(connection: Connection) -> None:
    """The fill only: SQLite without fsync (the benchmark's server uses its own connections)."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("PRAGMA synchronous = OFF")


def _insert(
    connection: Connection,
    name: str,
    columns: Sequence[str],
    values: list[tuple[Any, ...]],
    rows: dict[str, int],
    progress: Progress | None = None,
) -> None:
    for start in range(0, len(values), BATCH):
        batch = values[start : start + BATCH]
        BulkInsert.of(table(name), connection.dialect, columns).run(connection, batch)
        if progress is not None:
            progress.advance(len(batch))
    rows[name] = rows.get(name, 0) + len(values)


def _registry(
    connection: Connection,
    population: Population,
    now: datetime,
    rows: dict[str, int],
    progress: Progress,
) -> None:
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    long_ago = month_start - timedelta(days=90)
    participant_columns = (
        "participant_id", "scheme", "pooling_region", "status", "balance_fen", "created_at",
        "updated_at",
    )  # fmt: skip
    _insert(
        connection,
        "participants",
        participant_columns,
        [
            (
                h,
                "EMPLOYEE",
                REGIONS[i % len(REGIONS)],
                "ACTIVE",
                HOLDER_SPARE_FEN,
                long_ago,
                long_ago,
            )
            for i, h in enumerate(population.holders)
        ],
        rows,
        progress,
    )
    _insert(
        connection,
        "participants",
        participant_columns,
        [
            (
                b,
                "EMPLOYEE" if i % 3 == 0 else "RESIDENT",
                REGIONS[i % len(REGIONS)],
                "ACTIVE",
                0,
                long_ago,
                long_ago,
            )
            for i, b in enumerate(population.beneficiaries)
        ],
        rows,
        progress,
    )
    _insert(
        connection,
        "merchants",
        ("merchant_id", "kind", "pooling_region", "designated", "name", "updated_at"),
        [
            (
                f"bench-m{m:03d}",
                "RETAIL_PHARMACY" if m % 2 else "MEDICAL_INSTITUTION",
                REGIONS[m % len(REGIONS)],
                True,
                f"bench merchant {m}",
                long_ago,
            )
            for m in range(MERCHANTS)
        ],
        rows,
        progress,
    )
    relations = ["SPOUSE", "PARENT", "CHILD", "SIBLING"]
    _insert(
        connection,
        "relationships",
        (
            "relationship_id",
            "holder_id",
            "beneficiary_id",
            "relation",
            "status",
            "holder_consented",
            "beneficiary_consented",
            "created_channel",
            "created_at",
            "activated_at",
            "allocated_total_fen",
            "released_total_fen",
            "captured_total_fen",
            "refunded_to_quota_total_fen",
        ),
        [
            (
                population.relationship_ids[r],
                population.holders[population.holder_of(r)],
                population.beneficiaries[r // 2],
                relations[r % len(relations)],
                "ACTIVE",
                True,
                True,
                "APP",
                long_ago,
                long_ago + timedelta(minutes=r % 1000),
                population.allocated[r],
                0,
                0,
                0,
            )
            for r in range(population.relationships)
        ],
        rows,
        progress,
    )
    # The holders' credits, then one allocation per relationship (its quota's money).
    credited = [HOLDER_SPARE_FEN] * len(population.holders)
    for r in range(population.relationships):
        credited[population.holder_of(r)] += population.allocated[r]
    ledger_columns = (
        "kind", "holder_id", "relationship_id", "authorization_id", "merchant_id", "amount_fen",
        "channel", "holder_region", "merchant_region", "created_at",
    )  # fmt: skip
    _insert(
        connection,
        "ledger_entries",
        ledger_columns,
        [
            ("ACCOUNT_CREDIT", h, None, None, None, credited[i], None, None, None, long_ago)
            for i, h in enumerate(population.holders)
        ],
        rows,
    )
    _insert(
        connection,
        "ledger_entries",
        ledger_columns,
        [
            (
                "QUOTA_ALLOCATION",
                population.holders[population.holder_of(r)],
                population.relationship_ids[r],
                None,
                None,
                population.allocated[r],
                "APP",
                None,
                None,
                long_ago + timedelta(minutes=r % 1000),
            )
            for r in range(population.relationships)
        ],
        rows,
        progress,
    )


def _decisions(
    engine: Any,
    population: Population,
    arguments: argparse.Namespace,
    now: datetime,
    rng: random.Random,
    rows: dict[str, int],
    progress: Progress,
) -> None:
    """--decisions rows of `authorizations` (the last --open-holds of them still open), with the
    captures, capture parts and CAPTURE ledger rows of the captured ones."""
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    opened = min(arguments.open_holds, arguments.decisions)
    past = arguments.decisions - opened
    beneficiaries = len(population.beneficiaries)
    # One open hold per beneficiary while there are enough, on randomly chosen ones.
    open_owners = (
        rng.sample(range(beneficiaries), opened)
        if opened <= beneficiaries
        else [rng.randrange(beneficiaries) for _ in range(opened)]
    )
    for start in range(0, arguments.decisions, BATCH):
        authorizations: list[tuple[Any, ...]] = []
        captures: list[tuple[Any, ...]] = []
        parts: list[tuple[Any, ...]] = []
        ledger: list[tuple[Any, ...]] = []
        for i in range(start, min(start + BATCH, arguments.decisions)):
            if i < past:
                _past_decision(
                    i, population, rng, now, month_start, authorizations, captures, parts, ledger
                )
            else:
                _open_hold(i, open_owners[i - past], population, rng, now, authorizations)
        with engine.begin() as connection:
            _fast_sqlite(connection)
            _insert(connection, "authorizations", AUTHORIZATION_COLUMNS, authorizations, rows)
            _insert(connection, "captures", CAPTURE_COLUMNS, captures, rows)
            _insert(connection, "capture_parts", PART_COLUMNS, parts, rows)
            _insert(connection, "ledger_entries", LEDGER_COLUMNS, ledger, rows)
        progress.advance(len(authorizations))


AUTHORIZATION_COLUMNS = (
    "authorization_id", "merchant_id", "beneficiary_id", "purpose", "decision", "decline_reason",
    "requested_fen", "approved_fen", "funding", "idempotency_key", "request_digest", "response",
    "created_at", "expires_at", "voided_at",
)  # fmt: skip
CAPTURE_COLUMNS = (
    "authorization_id", "merchant_id", "merchant_region", "beneficiary_id", "purpose",
    "approved_fen", "amount_fen", "refunded_fen", "idempotency_key", "captured_at",
)  # fmt: skip
PART_COLUMNS = (
    "authorization_id", "relationship_id", "position", "holder_id", "holder_region", "amount_fen",
    "refunded_fen",
)  # fmt: skip
LEDGER_COLUMNS = (
    "kind", "holder_id", "relationship_id", "authorization_id", "merchant_id", "amount_fen",
    "channel", "holder_region", "merchant_region", "created_at",
)  # fmt: skip


def _response(authorization_id: str) -> bytes:
    """Stands for the stored AuthorizeResponse (about its size; never parsed by a rebuild)."""
    return b"\x0a\x20" + authorization_id.encode() + b"\x10\x01" + bytes(48)


def _funding(
    b: int, amount: int, population: Population, rng: random.Random, room: Callable[[int], int]
) -> list[tuple[int, int]]:
    """Quota parts (relationship index, fen) for `amount`, each within `room`; [] if none fits."""
    quotas = population.quotas_of(b)
    rng.shuffle(quotas)
    if len(quotas) > 1 and rng.random() < SPLIT_SHARE:
        first = amount // 2
        shares = [(quotas[0], first), (quotas[1], amount - first)]
        if all(room(r) >= fen for r, fen in shares):
            return shares
    for r in quotas:
        if room(r) >= amount:
            return [(r, amount)]
    return []


def _past_decision(
    i: int,
    population: Population,
    rng: random.Random,
    now: datetime,
    month_start: datetime,
    authorizations: list[tuple[Any, ...]],
    captures: list[tuple[Any, ...]],
    parts: list[tuple[Any, ...]],
    ledger: list[tuple[Any, ...]],
) -> None:
    b = rng.randrange(len(population.beneficiaries))
    beneficiary = population.beneficiaries[b]
    pharmacy = rng.random() < 0.6
    m = rng.randrange(MERCHANTS // 2) * 2 + (1 if pharmacy else 0)
    merchant = f"bench-m{m:03d}"
    purpose = "PHARMACY" if pharmacy else "MEDICAL_OUT_OF_POCKET"
    hold = PHARMACY_HOLD if pharmacy else MEDICAL_HOLD
    # Created this month, and expired by now (a hold still open is _open_hold's).
    latest = now - hold - timedelta(minutes=5)
    earliest = min(month_start, latest - timedelta(hours=6))
    created = earliest + (latest - earliest) * rng.random()
    expires = created + hold
    requested = rng.randrange(100, MAX_REQUEST_FEN)
    authorization_id = keys.new_authorization_id(beneficiary)
    key = f"bench-{i}"
    # Room for captures: what is allocated less a reserve for the open holds.
    reserve = 2 * MAX_REQUEST_FEN

    def room(r: int) -> int:
        return population.allocated[r] - population.captured[r] - reserve

    funding = [] if rng.random() < DECLINED_SHARE else _funding(b, requested, population, rng, room)
    if not funding:
        authorizations.append(
            (authorization_id, merchant, beneficiary, purpose, "DECLINED", "INSUFFICIENT_QUOTA",
             requested, 0, "", key, f"{i:064x}", _response(authorization_id), created, None,
             None)
        )  # fmt: skip
        return
    outcome = rng.random()
    voided = (
        created + (expires - created) * rng.random()
        if CAPTURED_SHARE <= outcome < CAPTURED_SHARE + VOIDED_SHARE
        else None
    )
    authorizations.append(
        (authorization_id, merchant, beneficiary, purpose, "APPROVED", None, requested, requested,
         format_funding((population.relationship_ids[r], fen) for r, fen in funding), key,
         f"{i:064x}", _response(authorization_id), created, expires, voided)
    )  # fmt: skip
    if outcome >= CAPTURED_SHARE:
        return
    captured_at = created + (expires - created) * rng.random() / 4
    region = REGIONS[m % len(REGIONS)]
    captures.append(
        (authorization_id, merchant, region, beneficiary, purpose, requested, requested, 0,
         f"capture-{i}", captured_at)
    )  # fmt: skip
    for position, (r, fen) in enumerate(funding):
        holder = population.holder_of(r)
        holder_region = REGIONS[holder % len(REGIONS)]
        population.captured[r] += fen
        parts.append(
            (authorization_id, population.relationship_ids[r], position,
             population.holders[holder], holder_region, fen, 0)
        )  # fmt: skip
        ledger.append(
            ("CAPTURE", population.holders[holder], population.relationship_ids[r],
             authorization_id, merchant, fen, None, holder_region, region, captured_at)
        )  # fmt: skip


def _open_hold(
    i: int,
    b: int,
    population: Population,
    rng: random.Random,
    now: datetime,
    authorizations: list[tuple[Any, ...]],
) -> None:
    """An approved medical hold made in the last 20 hours: it expires at least 4 hours from now,
    so none expires while the benchmark runs (the check compares Redis with SQL at one time)."""
    beneficiary = population.beneficiaries[b]
    m = rng.randrange(MERCHANTS // 2) * 2
    created = now - timedelta(hours=20) * rng.random() - timedelta(minutes=1)
    requested = rng.randrange(100, MAX_REQUEST_FEN)

    def room(r: int) -> int:
        return population.allocated[r] - population.captured[r] - population.held[r]

    funding = _funding(b, requested, population, rng, room)
    if not funding:
        raise SystemExit(f"beneficiary {beneficiary} has no room for another open hold")
    for r, fen in funding:
        population.held[r] += fen
    authorization_id = keys.new_authorization_id(beneficiary)
    authorizations.append(
        (authorization_id, f"bench-m{m:03d}", beneficiary, "MEDICAL_OUT_OF_POCKET", "APPROVED",
         None, requested, requested,
         format_funding((population.relationship_ids[r], fen) for r, fen in funding),
         f"bench-{i}", f"{i:064x}", _response(authorization_id), created, created + MEDICAL_HOLD,
         None)
    )  # fmt: skip


# --- the database ----------------------------------------------------------------------------


@contextmanager
def database(url: str | None, directory: Path) -> Iterator[str]:
    """A fresh database at head: a SQLite file in `directory`, or a private PostgreSQL schema
    (as tests/harness.py's fresh_database), dropped afterwards."""
    if not url:
        path = f"sqlite:///{directory / 'rebuild.sqlite3'}"
        upgrade_to_head(path)
        yield path
        return
    schema = f"rebuild_{uuid.uuid4().hex[:12]}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    separator = "&" if "?" in url else "?"
    private = f"{url}{separator}options=-csearch_path%3D{schema}"
    try:
        upgrade_to_head(private)
        yield private
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


# --- the service, and where a rebuild's time goes ----------------------------------------------


class Phases:
    """Wraps runtime/rebuild.py's steps with timers (module globals, put back by `restore`):
    delete_hot_state, each page (_page: SQL reads plus the page's Redis writes), the writes
    (_write), and within a page's SQL open_holds (the ledger marks are read with the
    relationships since 2026-12-05: in "the rest")."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.pages = 0
        # The first page's start and the last one's end: with pages in flight, their times
        # summed exceed the time they took.
        self.pages_from = self.pages_to = 0.0
        self.saved: dict[str, Any] = {}

    def reset(self) -> dict[str, float]:
        taken = dict(self.seconds)
        taken["pages"] = self.pages
        taken["pages_wall"] = max(0.0, self.pages_to - self.pages_from)
        self.seconds = {}
        self.pages = 0
        self.pages_from = self.pages_to = 0.0
        return taken

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def install(self) -> None:
        module: Any = rebuild_module
        for name in ("delete_hot_state", "_write", "_page", "open_holds"):
            self.saved[name] = getattr(module, name)
        for name in ("delete_hot_state", "_write"):
            setattr(module, name, self._timed_async(name, self.saved[name]))
        for name in ("_page", "open_holds"):
            setattr(module, name, self._timed(name, self.saved[name]))

    def restore(self) -> None:
        for name, function in self.saved.items():
            setattr(rebuild_module, name, function)

    def _timed_async(
        self, name: str, function: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                self._add(_write_kind(name, args), time.perf_counter() - started)

        return timed

    def _timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                self._add(name, ended - started)
                if name == "_page":
                    self.pages += 1
                    if not self.pages_from or started < self.pages_from:
                        self.pages_from = started
                    self.pages_to = max(self.pages_to, ended)

        return timed


def _write_kind(name: str, args: tuple[Any, ...]) -> str:
    """A page's write (its slot marks lead: SET ... GET) is `_write`; the witnesses' writes
    around the pages are not a page's (counted in "other")."""
    if name != "_write":
        return name
    commands = args[1] if len(args) > 1 else []
    if commands and commands[0][0] == "SET" and commands[0][-1] == "GET":
        return "_write"
    return "_write_witnesses"


class Service:
    """A private redis-server and the Application on its own loop in a thread (as
    tests/harness.py starts them)."""

    def __init__(self, directory: Path, database_url: str, event_loop_choice: str) -> None:
        self.redis = EmbeddedRedis(directory / "redis", persistent=False)
        self.redis_url = redis_url = self.redis.start()
        tokens = directory / "tokens.json"
        tokens.write_text(json.dumps({"bench-admin": {"kind": "admin"}}))
        settings = replace(
            Settings(),
            grpc_host="127.0.0.1",
            grpc_port=0,
            metrics_port=0,
            data_dir=directory,
            database_url=database_url,
            tokens_file=str(tokens),
            event_loop=event_loop_choice,
            # Its reconciles are timed alone (--reconciles), not beside the rolling one's pages.
            reconcile_quotas_per_second=0,
        )
        self.loop = event_loop.loop_factory(settings.event_loop)()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app: Application = self.run(self._make(settings, redis_url))
        self.port = self.run(self.app.start(), timeout=3600)

    async def _make(self, settings: Settings, redis_url: str) -> Application:
        return Application(settings, redis_url)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        try:
            self.run(self.app.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.redis.stop()


@dataclass
class RunResult:
    total_seconds: float
    noticed_seconds: float
    detection_seconds: float
    rebuild_seconds: float
    quotas: int
    beneficiaries: int
    open_holds: int
    deleted_keys: int
    phases: dict[str, float] = field(default_factory=dict)
    checked_quotas: int = 0
    pages_in_flight: int = 1
    cpu_seconds: float = 0.0  # this process's CPU (all its threads) from FLUSHALL to serving


def lose_redis(
    service: Service, phases: Phases, timeout: float, loss: str = "flushall"
) -> RunResult:
    """FLUSHALL (or, `loss` "forget", only the published generation deleted: Redis keeps every
    other key, as a replica promoted with its copy does, and the rebuild must delete them
    first), then waits until the guardian trusts Redis again with a new rebuild."""
    app = service.app
    before = app.guardian.last_rebuild
    phases.reset()
    flushed_at = time.perf_counter()
    cpu_at = time.process_time()

    async def flushall() -> None:
        if loss == "forget":
            await app.pipelined_redis.execute("DEL", keys.GENERATION)
        else:
            await app.pipelined_redis.execute("FLUSHALL")

    service.run(flushall())
    noticed_at: float | None = None
    while True:
        report = app.guardian.last_rebuild
        ready = app.guardian.ready
        if noticed_at is None and not ready:
            noticed_at = time.perf_counter()
        if report is not before and ready:
            break
        if time.perf_counter() - flushed_at > timeout:
            raise SystemExit(f"the hot state was not rebuilt within {timeout:.0f} s")
        time.sleep(0.005)
    total = time.perf_counter() - flushed_at
    cpu_seconds = time.process_time() - cpu_at
    assert report is not None
    return RunResult(
        total_seconds=total,
        noticed_seconds=(noticed_at or flushed_at) - flushed_at,
        detection_seconds=total - report.seconds,
        rebuild_seconds=report.seconds,
        quotas=report.quotas,
        beneficiaries=report.beneficiaries,
        open_holds=report.open_holds,
        deleted_keys=report.deleted_keys,
        phases=phases.reset(),
        pages_in_flight=rebuild_module.PAGES_IN_FLIGHT,
        cpu_seconds=cpu_seconds,
    )


def check_sample(service: Service, sample: int, seed: int) -> int:
    """A sample of active quotas: Redis's figures are what SQL says (the ledger's unused money
    less the open holds). Raises SystemExit on any difference. Returns the quotas compared."""
    app = service.app

    def read(
        session: Session,
    ) -> tuple[dict[str, int], dict[str, str], list[Any], datetime]:
        ids = list(
            session.scalars(
                select(RelationshipRow.relationship_id).where(RelationshipRow.status == "ACTIVE")
            )
        )
        chosen = random.Random(seed).sample(ids, min(sample, len(ids)))
        rows = list(
            session.scalars(
                select(RelationshipRow).where(RelationshipRow.relationship_id.in_(chosen))
            )
        )
        unused = {
            row.relationship_id: row.allocated_total_fen - row.released_total_fen
            - row.captured_total_fen + row.refunded_to_quota_total_fen
            for row in rows
        }  # fmt: skip
        owners = {row.relationship_id: row.beneficiary_id for row in rows}
        now = datetime.now(UTC)
        holds = open_holds(session, now, beneficiary_ids=sorted(set(owners.values())))
        return unused, owners, holds, now

    unused, owners, holds, _ = app.database.transaction(read)
    chosen_holds = [hold for hold in holds if any(rid in unused for rid, _ in hold.funding)]
    expected = expected_figures(unused, chosen_holds)
    by_beneficiary: dict[str, list[str]] = {}
    for relationship_id, beneficiary_id in owners.items():
        by_beneficiary.setdefault(beneficiary_id, []).append(relationship_id)

    async def shown_all() -> dict[str, QuotaFigures]:
        shown: dict[str, QuotaFigures] = {}
        for beneficiary_id, relationship_ids in by_beneficiary.items():
            shown.update(await app.quotas.figures(beneficiary_id, relationship_ids))
        return shown

    shown = service.run(shown_all())
    different = [
        (relationship_id, shown.get(relationship_id), figures)
        for relationship_id, figures in expected.items()
        if shown.get(relationship_id) != figures
    ]
    if different:
        raise SystemExit(
            f"Redis differs from SQL on {len(different)} of {len(expected)} sampled quotas, "
            f"e.g. (relationship, Redis, SQL): {different[:5]}"
        )
    return len(expected)


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settlement:
    """The sweeper's settlement of the holds the last rebuild put back (each listed, settled as
    SQL says once STALE_CAPTURE_SECONDS have passed: service/capture_recovery.py)."""

    holds: int  # ids the sweeper's settle calls were given
    calls: int
    settle_seconds: float  # in those calls
    cpu_seconds: float  # this process's CPU (all its threads) during those calls
    serving_to_settled_seconds: float  # from serving again until nothing was listed
    # ids given meanwhile to the settle calls of another Application in this process (not
    # counted above): the patched function is the module's, seen by every Application, and a
    # test process runs others beside the benchmark's (tests/conftest.py's session service)
    other_holds: int = 0


def time_settlement(service: Service, serving_since: float, timeout: float) -> Settlement:
    """Waits until the sweeper has settled every hold the last rebuild put back (nothing listed
    in keys.CAPTURES_BEGUN), timing its settle calls (capture_recovery.settle_stalled, as the
    sweeper calls it). Reconciles timed later then do not share the process with it. Only the
    service's own calls are timed: another Application in the process (a test's) calls the same
    patched function, and its holds are not the benchmark's."""
    import redis

    calls: list[tuple[int, float, float]] = []
    others: list[int] = []
    real = capture_recovery.settle_stalled

    async def timed(database: Any, holds: Any, stalled: list[str], now_ms: int) -> int:
        if holds is not service.app.holds:
            if stalled:
                others.append(len(stalled))
            return await real(database, holds, stalled, now_ms)
        began, cpu = time.perf_counter(), time.process_time()
        try:
            return await real(database, holds, stalled, now_ms)
        finally:
            if stalled:
                calls.append((len(stalled), time.perf_counter() - began, time.process_time() - cpu))

    capture_recovery.settle_stalled = timed
    client = redis.Redis.from_url(service.redis_url)
    try:
        deadline = time.monotonic() + timeout
        while client.zcard(keys.CAPTURES_BEGUN) or not calls:
            if time.monotonic() > deadline:
                raise SystemExit(f"the put-back holds were not settled within {timeout:.0f} s")
            time.sleep(0.1)
    finally:
        capture_recovery.settle_stalled = real
        client.close()
    return Settlement(
        holds=sum(count for count, _, _ in calls),
        calls=len(calls),
        settle_seconds=sum(seconds for _, seconds, _ in calls),
        cpu_seconds=sum(cpu for _, _, cpu in calls),
        serving_to_settled_seconds=time.perf_counter() - serving_since,
        other_holds=sum(others),
    )


def time_reconciles(service: Service, count: int) -> list[tuple[float, ReconcileReport]]:
    """Reconciles every quota `count` times, timed, while the server serves (what the rolling
    reconcile does a page at a time). Right after a rebuild there must be no drift: SystemExit
    otherwise."""
    app = service.app
    timed: list[tuple[float, ReconcileReport]] = []
    with Progress(count, "reconciles", unit="runs") as progress:
        for _ in range(count):
            began = time.perf_counter()
            report = service.run(reconcile(app.database, app.quotas, app.holds), timeout=3600)
            timed.append((time.perf_counter() - began, report))
            if report.drifted:
                raise SystemExit(f"reconcile found {report.drifted} quotas drifted: {report}")
            progress.advance(1)
    return timed


def breakdown(run: RunResult) -> dict[str, float]:
    """Where one run's time went, in seconds (the parts add up to total_seconds). With pages in
    flight the pages' parts, summed over the pages, are scaled to the time the pages took from
    the first one's start to the last one's end: each part keeps its share."""
    delete = run.phases.get("delete_hot_state", 0.0)
    pages = run.phases.get("_page", 0.0)
    pages_wall = run.phases.get("pages_wall", pages) or pages
    scale = pages_wall / pages if pages else 1.0
    write = run.phases.get("_write", 0.0) * scale
    holds = run.phases.get("open_holds", 0.0) * scale
    sql = pages_wall - write
    return {
        "detection": run.detection_seconds,
        "delete what Redis had": delete,
        "SQL: open holds": holds,
        "SQL: relationships, the rest": sql - holds,
        "Redis writes": write,
        "other": max(0.0, run.rebuild_seconds - delete - sql - write),
    }


COLUMNS = {
    "detection": "detect",
    "delete what Redis had": "delete",
    "SQL: open holds": "holds",
    "SQL: relationships, the rest": "rel+",
    "Redis writes": "Redis",
    "other": "other",
}


def summary(runs: list[RunResult]) -> str:
    header = f"{'run':>3} {'pages':>5} {'serving again':>14} {'rebuild':>8} {'CPU':>7} "
    header += " ".join(f"{short:>7}" for short in COLUMNS.values())
    header += f" {'quotas':>8} {'open holds':>10} {'deleted':>8}"
    lines = [header]
    for number, run in enumerate(runs, 1):
        parts = breakdown(run)
        line = f"{number:>3} {run.pages_in_flight:>5} {run.total_seconds:>13.2f}s "
        line += f"{run.rebuild_seconds:>7.2f}s {run.cpu_seconds:>6.2f}s "
        line += " ".join(f"{parts[name]:>6.2f}s" for name in COLUMNS)
        line += f" {run.quotas:>8,} {run.open_holds:>10,} {run.deleted_keys:>8,}"
        lines.append(line)
    lines.append(
        "columns: pages = pages in flight; CPU = this process's (the service's threads), not "
        "Redis's or the database's; detect = FLUSHALL to the rebuild's start (the guardian's "
        "look, the lock); holds, rel+ = the pages' SQL (open_holds; the rest: relationships with "
        "their ledger marks, listing); Redis = the pages' writes (with pages in flight: shares "
        "of the pages' time)"
    )
    medians: dict[int, float] = {}
    for in_flight in sorted({run.pages_in_flight for run in runs}):
        totals = [run.total_seconds for run in runs if run.pages_in_flight == in_flight]
        cpu = [run.cpu_seconds for run in runs if run.pages_in_flight == in_flight]
        medians[in_flight] = statistics.median(totals)
        line = (
            f"serving again after a Redis loss, {in_flight} page(s) in flight: median "
            f"{medians[in_flight]:.2f} s, min {min(totals):.2f} s, max {max(totals):.2f} s "
            f"({len(totals)} runs; CPU median {statistics.median(cpu):.2f} s)"
        )
        first = min(medians)
        if in_flight != first:
            line += f": ×{medians[first] / medians[in_flight]:.2f} as fast as {first}"
        lines.append(line)
    return "\n".join(lines)


def chart(
    runs: list[RunResult],
    title: str,
    path: Path,
    reconciles: Sequence[tuple[float, ReconcileReport]] = (),
    settlement: Settlement | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ("#9e9e9e", "#ff7f0e", "#1f77b4", "#6baed6", "#d62728", "#bcbd22")
    figure, axis = plt.subplots(figsize=(8, 5.2))
    positions = list(range(1, len(runs) + 1))
    bottoms = [0.0] * len(runs)
    for name, color in zip(COLUMNS, colors, strict=True):
        values = [breakdown(run)[name] for run in runs]
        axis.bar(positions, values, 0.6, bottom=bottoms, label=name, color=color)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for position, run in zip(positions, runs, strict=True):
        axis.annotate(
            f"{run.total_seconds:.1f} s",
            (position, run.total_seconds),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    # Beside the losses: each reconcile of every quota while serving (--reconciles).
    reconcile_positions = [len(runs) + 1.5 + number for number in range(len(reconciles))]
    for number, (spot, (seconds, _)) in enumerate(
        zip(reconcile_positions, reconciles, strict=True)
    ):
        axis.bar(
            spot,
            seconds,
            0.6,
            color="#2ca02c",
            label="reconcile while serving" if not number else None,
        )
        axis.annotate(f"{seconds:.1f} s", (spot, seconds), ha="center", va="bottom", fontsize=9)
    # Last: the sweeper's settlement of the holds the last rebuild put back (--settle).
    settle_positions = []
    if settlement is not None:
        spot = len(runs) + 1.5 + len(reconciles)
        settle_positions.append(spot)
        axis.bar(spot, settlement.settle_seconds, 0.6, color="#9467bd", label="settling put-backs")
        axis.annotate(
            f"{settlement.settle_seconds:.1f} s\n(all {settlement.serving_to_settled_seconds:.0f} s"
            " after serving)",
            (spot, settlement.settle_seconds),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axis.axhline(30, color="black", linestyle="--", linewidth=0.8, label="aim: 30 s")
    axis.set_xticks(positions + reconcile_positions + settle_positions)
    axis.set_xticklabels(
        [
            f"run {p}\n{run.pages_in_flight} in flight"
            for p, run in zip(positions, runs, strict=True)
        ]
        + [f"reconcile {n}" for n in range(1, len(reconciles) + 1)]
        + ([f"settle {settlement.holds:,}\nput-back holds"] if settlement is not None else []),
        fontsize=8,
    )
    axis.set_ylabel("seconds")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.rebuild_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--database-url",
        help="PostgreSQL (a private schema is made and dropped); default: SQLite in a temp dir",
    )
    parser.add_argument("--relationships", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=1_000_000)
    parser.add_argument("--open-holds", type=int, default=20_000, help="part of --decisions")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--loss",
        choices=("flushall", "forget"),
        default="flushall",
        help="how Redis is lost: FLUSHALL, or forget (only the published generation deleted: "
        "the rebuild deletes every other key first, as after a failover to a replica)",
    )
    parser.add_argument(
        "--pages-in-flight",
        default=str(rebuild_module.PAGES_IN_FLIGHT),
        help="comma-separated: the runs take these values in turn (the rebuild's pages read and "
        "written at once; PostgreSQL only: SQLite has one SQL thread)",
    )
    parser.add_argument(
        "--reconciles",
        type=int,
        default=1,
        help="then times this many reconciles of every quota while serving, as the periodic "
        "one (MEDWALLET_RECONCILE_INTERVAL_SECONDS) runs; each must find no drift",
    )
    parser.add_argument(
        "--settle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the last loss, wait for the sweeper to settle the holds its rebuild put "
        "back (STALE_CAPTURE_SECONDS later), timed, before the reconciles",
    )
    parser.add_argument("--check", type=int, default=2_000, help="quotas compared per run")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run at most")
    parser.add_argument(
        "--event-loop", default=os.environ.get("MEDWALLET_EVENT_LOOP", Settings().event_loop)
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    arguments = parser.parse_args(argv)
    if arguments.relationships < 8:
        parser.error("--relationships: at least 8")
    try:
        in_flight_values = [int(value) for value in arguments.pages_in_flight.split(",")]
    except ValueError:
        parser.error("--pages-in-flight: comma-separated whole numbers, e.g. 1,4")
    if not in_flight_values or not all(1 <= value <= 8 for value in in_flight_values):
        parser.error("--pages-in-flight: each from 1 to 8 (the service's SQL threads)")
    default_in_flight = rebuild_module.PAGES_IN_FLIGHT
    started_at = datetime.now(UTC)
    load_at_start = os.getloadavg()
    directory = Path(tempfile.mkdtemp(prefix="rebuild-bench-"))
    kind = "postgresql" if arguments.database_url else "sqlite"
    phases = Phases()
    try:
        with database(arguments.database_url, directory) as url:
            fill_report = fill(url, arguments, datetime.now(UTC))
            print(
                f"filled in {fill_report.seconds:.1f} s: "
                + ", ".join(f"{rows:,} {name}" for name, rows in fill_report.rows.items())
            )
            phases.install()
            starting = time.perf_counter()
            service = Service(directory, url, arguments.event_loop)
            start_seconds = time.perf_counter() - starting
            first = service.app.guardian.last_rebuild
            print(
                f"service started in {start_seconds:.1f} s (its own rebuild of the empty Redis: "
                f"{first.seconds if first else 0:.1f} s)"
            )
            runs: list[RunResult] = []
            try:
                checked = check_sample(service, arguments.check, arguments.seed)
                print(f"after the start: {checked:,} sampled quotas in Redis equal SQL's")
                with Progress(arguments.runs, "Redis losses", unit="runs") as progress:
                    for number in range(arguments.runs):
                        in_flight = in_flight_values[number % len(in_flight_values)]
                        rebuild_module.PAGES_IN_FLIGHT = in_flight
                        result = lose_redis(service, phases, arguments.timeout, arguments.loss)
                        serving_since = time.perf_counter()
                        result.checked_quotas = check_sample(
                            service, arguments.check, arguments.seed + number + 1
                        )
                        runs.append(result)
                        progress.advance(1)
                settlement = None
                if arguments.settle and runs and runs[-1].open_holds:
                    print(
                        f"waiting for the sweeper to settle the {runs[-1].open_holds:,} holds "
                        f"the last rebuild put back (it waits {STALE_CAPTURE_SECONDS} s first)"
                    )
                    settlement = time_settlement(service, serving_since, arguments.timeout)
                reconciles = time_reconciles(service, arguments.reconciles)
            finally:
                rebuild_module.PAGES_IN_FLIGHT = default_in_flight
                service.close()
                phases.restore()
    finally:
        if not arguments.keep:
            shutil.rmtree(directory, ignore_errors=True)
    expected_holds = min(arguments.open_holds, arguments.decisions)
    for run in runs:
        if run.open_holds != expected_holds or run.quotas != arguments.relationships:
            raise SystemExit(
                f"a rebuild put back {run.quotas} quotas and {run.open_holds} open holds; "
                f"expected {arguments.relationships} and {expected_holds}"
            )
    print(summary(runs))
    if settlement is not None:
        print(
            f"put-back holds settled by the sweeper: {settlement.holds:,} in "
            f"{settlement.settle_seconds:.2f} s ({settlement.calls} calls, "
            f"{settlement.settle_seconds / max(1, settlement.holds) * 1e6:.0f} µs a hold, CPU "
            f"{settlement.cpu_seconds:.2f} s); all settled "
            f"{settlement.serving_to_settled_seconds:.1f} s after serving again"
        )
    for number, (seconds, report) in enumerate(reconciles, 1):
        print(
            f"reconcile {number} while serving: {seconds:.2f} s for {report.quotas:,} quotas "
            f"({seconds / max(1, report.quotas) * 1e6:.0f} µs a quota), {report.drifted} drifted"
        )
    print(
        f"each run: {runs[0].checked_quotas:,} sampled quotas in Redis equal SQL's "
        f"(ledger less open holds); rebuild pages: {int(runs[0].phases.get('pages', 0))}"
    )
    arguments.out.mkdir(parents=True, exist_ok=True)
    stem = f"rebuild-{kind}-{arguments.relationships}"
    document = {
        "date": started_at.isoformat(timespec="seconds"),
        "command": " ".join(["python -m loadtest.rebuild_benchmark", *(argv or sys.argv[1:])]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
        },
        "settings": {
            "database": kind,
            "relationships": arguments.relationships,
            "decisions": arguments.decisions,
            "open_holds": arguments.open_holds,
            "event_loop": arguments.event_loop,
            "beneficiaries_per_page": rebuild_module.BENEFICIARIES_PER_PAGE,
            "pages_in_flight": in_flight_values,
            "loss": arguments.loss,
        },
        "fill": asdict(fill_report),
        "service_start_seconds": start_seconds,
        "runs": [{**asdict(run), "breakdown": breakdown(run)} for run in runs],
        "median_total_seconds": statistics.median(run.total_seconds for run in runs),
        "reconciles": [{"seconds": seconds, **asdict(report)} for seconds, report in reconciles],
        "settlement": asdict(settlement) if settlement is not None else None,
    }
    (arguments.out / f"{stem}.json").write_text(json.dumps(document, indent=1) + "\n")
    title = (
        f"FLUSHALL to serving again{', and a reconcile while serving' if reconciles else ''}: "
        f"{kind}, {arguments.relationships:,} relationships,\n"
        f"{arguments.decisions:,} decisions ({arguments.open_holds:,} open), "
        f"{os.cpu_count()} cores, {started_at:%Y-%m-%d %H:%M} UTC"
    )
    chart(runs, title, arguments.out / f"{stem}.png", reconciles, settlement)
    print(f"results in {arguments.out}/{stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
