"""Rebuilds the whole hot state in Redis from SQL under a new generation, after Redis lost its
data (or may have: a restart, a failover). storage/redis/generation.py says how the generation
keeps every server from deciding on Redis meanwhile; runtime/hot_state.py decides when to
rebuild and makes sure only one server does.

1. keys.GENERATION says REBUILDING: every server answers UNAVAILABLE (health NOT_SERVING), and
   the journal refuses decisions of the old generation once the ones journaled before have
   committed (storage/sql/journal_fence.py).
2. Every key of the hot state is deleted: whatever Redis still had (a restart with part of its
   file, a replica's older copy) may be wrong, and nothing is decided on it again.
3. SQL is read a page of beneficiaries at a time (up to PAGES_IN_FLIGHT pages at once, each in
   its own transaction), under their relationships' row locks, and the
   page is written to Redis before the locks are let go (as reconcile does, service/quota_sync.py
   says why): quotas with the ledger's figures less the open holds, the open holds themselves
   with their expiry (domain/hot_state.py), each slot marked with the new generation first.
   Each hold put back is listed for the sweeper to settle as SQL says: a capture claimed in the
   Redis that was lost may commit after this read, its process gone before it finished the hold
   (storage/redis/rebuild_writer.py page_commands, service/capture_recovery.py).
   A slot found marked already is an earlier rebuild's page that reached Redis late (its write
   timed out, the commands were only delayed): this rebuild fails, and the next one sweeps it
   (storage/redis/rebuild_writer.py page_commands, page_writes: each write of a page carries
   its slots' marks; a late page that lands after this rebuild
   wrote the slot is found by the scripts: MWSTALE, storage/redis/generation.py). Before
   each page's write the rebuild checks keys.GENERATION still names it: taken over by another
   server, it stops, rather than leave that rebuild late pages until its lock's next renewal.
   Around the pages, every Redis hash slot's witness (keys.witness) is written: pending once
   Redis is emptied, the new generation after the last page where still pending; so a node
   that lost its data since is known lost although keys.GENERATION, on another node of a
   Redis Cluster, looks complete (storage/redis/generation.py).
4. keys.GENERATION names the new generation and the Redis runs it was built in (every
   primary's run id): servers adopt it at their next call and serve again.
Idempotency records are not copied back: a retry whose record Redis lost gets SQL's stored answer
(service/journal.py), so the rebuild costs what is open now, not every decision of the month.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from authz_server.domain.model import QuotaTotals
from authz_server.domain.types import RelationshipStatus, Scheme
from authz_server.runtime.rebuild_progress import RebuildProgress, count_beneficiaries
from authz_server.runtime.reconcile_dissolved import dissolutions_cursor_at
from authz_server.service.clock import Clock, system_clock
from authz_server.service.quota_sync import ledger_marks_where, on_loop, quota_restore
from authz_server.storage.redis import keys
from authz_server.storage.redis.generation import REBUILDING, new_generation
from authz_server.storage.redis.pipelined import Command, PipelinedRedis
from authz_server.storage.redis.rebuild_writer import (
    delete_hot_state,
    late_page_marks,
    page_commands,
    page_writes,
    witness_commands,
)
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.journal_fence import wait_for_journal
from authz_server.storage.sql.open_holds import open_holds
from authz_server.storage.sql.records import utc
from authz_server.storage.sql.tables import ParticipantRow, RelationshipRow

log = logging.getLogger(__name__)
# Beneficiaries per page: their relationships stay locked for one round of Redis writes.
BENEFICIARIES_PER_PAGE = 500
# Pages read and written at once, each in its own transaction on its own SQL thread (PostgreSQL:
# one connection each; SQLite has one SQL thread, so its pages still go one at a time). The
# pages name disjoint beneficiaries, so their row locks do not meet and their Redis commands
# commute (a slot two pages share is marked by both with this generation; the index zsets only
# gain members). Below the SQL threads (storage/sql/database.py, 8): captures and the rest keep
# some meanwhile. Measured in loadtest/RESULTS.md ("The rebuild's pages in parallel").
PAGES_IN_FLIGHT = 4
# Commands per write to Redis, far below the connection's bound on commands in flight.
COMMANDS_PER_WRITE = 2000
# What a quota's restore needs of its relationship (quota_sync.quota_restore).
QUOTA_COLUMNS = (
    RelationshipRow.relationship_id,
    RelationshipRow.beneficiary_id,
    RelationshipRow.holder_id,
    RelationshipRow.status,
    RelationshipRow.created_at,
    RelationshipRow.activated_at,
    RelationshipRow.allocated_total_fen,
    RelationshipRow.released_total_fen,
    RelationshipRow.captured_total_fen,
    RelationshipRow.refunded_to_quota_total_fen,
)

# Sets KEYS[1] to ARGV[2] if it is ARGV[1]: 1 when it did (keys.GENERATION's compare-and-set:
# a rebuild publishing its generation, the guardian publishing new runs).
REPLACE_IF_UNCHANGED = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) "
    "return 1 end return 0"
)


class LatePageFound(Exception):
    """A slot already marked when this rebuild's page marked it: a page of an earlier rebuild
    reached Redis after this one's sweep. The rebuild fails; the guardian's next look starts a
    new one, which sweeps it."""


class RebuildAbandoned(Exception):
    """Another server took the rebuild over (this one's lock expired): its result stands."""


class RebuildStopped(Exception):
    """A page not read or not written: another page of its rebuild failed first, or the rebuild
    was cancelled. That cause is what the rebuild raises."""


@dataclass(frozen=True)
class RebuildReport:
    generation: str
    deleted_keys: int
    beneficiaries: int
    quotas: int
    open_holds: int
    seconds: float


async def rebuild_hot_state(
    database: Database,
    redis: PipelinedRedis,
    run_ids: str,
    still_owner: asyncio.Event | None = None,
    clock: Clock = system_clock,
    pages_in_flight: int | None = None,
) -> RebuildReport:
    """Rebuilds everything under a new generation and publishes it with `run_ids` (the
    primaries' run ids read before the rebuild began, runs.redis_run_ids: a failover
    meanwhile makes the published marker stale at once, and the hot state is rebuilt again).
    `still_owner` (when given) is cleared by the caller if it lost the rebuild lock: the
    rebuild then stops unpublished. `pages_in_flight`: PAGES_IN_FLIGHT unless given."""
    started = time.perf_counter()
    begun = clock()
    generation = new_generation()
    await redis.execute("SET", keys.GENERATION, f"{REBUILDING}|{generation}")
    # Every decision journaled from now on is refused; those journaled before are read below
    # (storage/sql/journal_fence.py).
    await database.run(wait_for_journal)
    deleted = await delete_hot_state(redis)
    await _write(redis, witness_commands(f"{REBUILDING}|{generation}"))
    progress = RebuildProgress(generation)
    counting = asyncio.ensure_future(database.run(count_beneficiaries))  # beside the pages
    counting.add_done_callback(
        lambda done: (
            progress.set_total(done.result())
            if not done.cancelled() and done.exception() is None
            else None
        )
    )
    try:
        beneficiaries, quotas, holds = await _write_pages(
            database, redis, generation, still_owner, clock, pages_in_flight, progress
        )
    finally:
        if not counting.done():
            counting.cancel()
    if still_owner is not None and not still_owner.is_set():
        raise RebuildAbandoned(generation)
    # After every page, before publishing: a witness naming the generation is younger than all
    # the rebuild wrote to its node. XX: a node emptied since the pending witnesses keeps none.
    await _write(redis, witness_commands(generation, only_existing=True))
    # The rolling reconcile's dissolutions cursor went with the rest of mw:* (step 2), and
    # started afresh it would read every dissolution ever made before the newest: those
    # committed before this rebuild began are in Redis as SQL says (dissolved: no quota
    # written), so it starts at the rebuild's start, less its grace for clock skew.
    await redis.execute(
        "SET", keys.RECONCILE_DISSOLVED_CURSOR, dissolutions_cursor_at(begun)
    )  # fmt: skip
    # Published only while keys.GENERATION still names this rebuild: another server that took
    # the rebuild over (this one's lock expired) has marked its own and swept Redis since.
    published = await redis.execute(
        "EVAL", REPLACE_IF_UNCHANGED, 1, keys.GENERATION, f"{REBUILDING}|{generation}",
        f"{generation}|{run_ids}",
    )  # fmt: skip
    if published != 1:
        raise RebuildAbandoned(generation)
    report = RebuildReport(
        generation=generation,
        deleted_keys=deleted,
        beneficiaries=beneficiaries,
        quotas=quotas,
        open_holds=holds,
        seconds=time.perf_counter() - started,
    )
    log.warning(
        "hot state rebuilt from SQL: generation %s, %d quotas of %d beneficiaries, %d open "
        "holds, %d stale keys deleted, %.1f s",
        generation, quotas, beneficiaries, holds, deleted, report.seconds,
    )  # fmt: skip
    return report


def _page_end(session: Session, after: str) -> str | None:
    """The last beneficiary of the page after `after`: BENEFICIARIES_PER_PAGE of them in id order
    (fewer at the end; None past it). No locks: _page takes them."""
    page = (
        select(RelationshipRow.beneficiary_id)
        .distinct()
        .where(RelationshipRow.beneficiary_id > after)
        .order_by(RelationshipRow.beneficiary_id)
        .limit(BENEFICIARIES_PER_PAGE)
        .subquery()
    )
    last: str | None = session.scalar(select(func.max(page.c.beneficiary_id)))
    return last


async def _write_pages(
    database: Database,
    redis: PipelinedRedis,
    generation: str,
    still_owner: asyncio.Event | None,
    clock: Clock,
    pages_in_flight: int | None,
    progress: RebuildProgress,
) -> tuple[int, int, int]:
    """Every beneficiary's page written, up to `pages_in_flight` at once: (beneficiaries, quotas,
    open holds). The pages are listed here in turn (keyset, cheap) and each read under its row
    locks and written by a task of its own. The first page to fail stops the listing; the pages
    already in flight are waited for before its error is raised, so no page of this rebuild is
    still being read or written once it has ended (the next rebuild's sweep comes after them)."""
    limit = max(1, pages_in_flight if pages_in_flight is not None else PAGES_IN_FLIGHT)
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[tuple[int, int, int]]] = set()
    totals = [0, 0, 0]
    stopped: list[BaseException] = []  # pages a failure stopped: raised if nothing else is

    def count(done: set[asyncio.Task[tuple[int, int, int]]]) -> None:
        failure = _first_failure(done)
        if failure is not None and not isinstance(failure, RebuildStopped):
            raise failure
        for task in done:
            error = RebuildStopped(generation) if task.cancelled() else task.exception()
            if error is not None:
                stopped.append(error)
                continue
            page_figures = task.result()
            progress.page_done(*page_figures)
            for index, figure in enumerate(page_figures):
                totals[index] += figure

    failed = threading.Event()  # set on its SQL thread by the first page that fails
    # One page's write to Redis at a time: the rebuild keeps at most COMMANDS_PER_WRITE commands
    # in flight on the connection the calls share, as with one page in flight (its bound on
    # pending commands, its timeout). The pages' SQL still overlaps.
    write_turn = asyncio.Lock()

    def page(session: Session, last: str, after: str) -> tuple[int, int, int]:
        if failed.is_set():
            raise RebuildStopped(generation)  # not begun
        try:
            return _page(
                session, (after, last), generation, redis, loop, clock(), write_turn, failed
            )
        except BaseException:
            failed.set()
            raise

    after = ""
    try:
        while True:
            if still_owner is not None and not still_owner.is_set():
                raise RebuildAbandoned(generation)
            if failed.is_set():  # a page failed: its task holds the error, raised below
                break
            last = await database.run(partial(_page_end, after=after))
            if last is None:
                break
            while len(in_flight) >= limit:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                count(done)
            in_flight.add(
                asyncio.ensure_future(database.run(partial(page, last=last, after=after)))
            )
            after = last
        while in_flight:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            count(done)
        if stopped:  # a page not written and no other error seen: never published so
            raise stopped[0]
    finally:
        # A page failed, the listing did, or the rebuild was cancelled (a server stopping): the
        # pages handed to a SQL thread but not begun, or waiting for their turn to write, stop.
        failed.set()
        if in_flight:
            # Those begun still run on their SQL threads (a thread is not interrupted): waited
            # out, so none is read or written once the rebuild has ended.
            await asyncio.wait(in_flight)
            _first_failure(in_flight)  # their errors read: the first one is already raised
    return totals[0], totals[1], totals[2]


def _first_failure(tasks: set[asyncio.Task[tuple[int, int, int]]]) -> BaseException | None:
    """The first error of these finished tasks, every task's error read (none left to be logged
    as never retrieved)."""
    failures = [task.exception() for task in tasks if not task.cancelled()]
    found = [failure for failure in failures if failure is not None]
    found.sort(key=lambda failure: isinstance(failure, RebuildStopped))  # the cause first
    return found[0] if found else None


def _page(
    session: Session,
    beneficiaries: tuple[str, str],
    generation: str,
    redis: PipelinedRedis,
    loop: asyncio.AbstractEventLoop,
    now: datetime,
    write_turn: asyncio.Lock,
    failed: threading.Event,
) -> tuple[int, int, int]:
    """One page of beneficiaries, those after beneficiaries[0] up to beneficiaries[1], read under
    their relationships' row locks and written to Redis before those are let go: (beneficiaries,
    quotas, open holds). A range, not a list of ids: the queries' texts are then the same for
    every page, short, and parsed, planned and cached once (a list of 500 ids made each query
    text ~10 KB, converted anew by the driver every time: loadtest/RESULTS.md, "The rebuild's
    pages in parallel"). A beneficiary whose first relationship was made in the range since the
    page was listed is read too, under the same locks."""
    after, last = beneficiaries
    in_page = and_(RelationshipRow.beneficiary_id > after, RelationshipRow.beneficiary_id <= last)
    # Columns, not ORM objects and Relationships: building 100,000 of those took ~1.5 s of a
    # 7 s rebuild (loadtest/rebuild_benchmark.py, loadtest/RESULTS.md "Redis loss").
    rows = session.execute(
        select(*QUOTA_COLUMNS, ParticipantRow.scheme)
        .join(ParticipantRow, ParticipantRow.participant_id == RelationshipRow.beneficiary_id)
        .where(in_page)
        .order_by(RelationshipRow.relationship_id)
        .with_for_update(of=RelationshipRow)
    ).all()
    # After the locks, not in the locked read: quota_sync.ledger_marks_where says why.
    marks = ledger_marks_where(session, in_page)
    active = RelationshipStatus.ACTIVE.value
    quotas = [
        quota_restore(
            relationship_id=row.relationship_id,
            beneficiary_id=row.beneficiary_id,
            holder_id=row.holder_id,
            active=row.status == active,
            totals=QuotaTotals(
                allocated_total_fen=row.allocated_total_fen,
                released_total_fen=row.released_total_fen,
                captured_total_fen=row.captured_total_fen,
                refunded_to_quota_total_fen=row.refunded_to_quota_total_fen,
            ),
            activated_at=utc(row.activated_at or row.created_at),
            beneficiary_scheme=Scheme(row.scheme),
            ledger_mark=marks.get(row.relationship_id, 0),
        )
        for row in rows
    ]
    holds = open_holds(
        session,
        now,
        beneficiaries=(after, last),
        known_active={quota.relationship_id: quota.active for quota in quotas},
    )
    # Each write of the page led by its slots' marks (page_writes): any write of it that
    # reaches Redis late carries them.
    writes = page_writes(
        page_commands(generation, quotas, holds, int(now.timestamp() * 1000)), COMMANDS_PER_WRITE
    )
    replies = on_loop(loop, _write_page(redis, generation, writes, write_turn, failed))
    late = late_page_marks(generation, [command for write in writes for command in write], replies)
    if late:
        # Written over: the page is right now, but what else that late page left (a hold
        # closed since, in a slot's sets) is not. Swept again by the next rebuild.
        log.error(
            "hot state rebuild %s: %d slot(s) marked by another generation since its sweep "
            "(an earlier rebuild's page arrived late), e.g. %s: starting again",
            generation, len(late), late[0],
        )  # fmt: skip
        raise LatePageFound(f"{len(late)} slot(s) marked since the sweep, e.g. {late[0]}")
    return len({row.beneficiary_id for row in rows}), len(quotas), len(holds)


async def _still_rebuilding(redis: PipelinedRedis, generation: str) -> bool:
    """Whether keys.GENERATION still names this rebuild."""
    marker = await redis.execute("GET", keys.GENERATION)
    return isinstance(marker, bytes) and marker.decode() == f"{REBUILDING}|{generation}"


async def _write_page(
    redis: PipelinedRedis,
    generation: str,
    writes: list[list[Command]],
    write_turn: asyncio.Lock,
    failed: threading.Event,
) -> list[object]:
    """A page's commands written in its turn. Another server that took the rebuild over (this
    one's lock expired unnoticed: it is renewed every few seconds) has swept Redis since: a page
    written now would be a late page for it, and cost it a rebuild more (LatePageFound). Asked
    once a page, right before its write: at most the page being written while the lock changes
    hands lands. A page waiting for its turn when another page failed is not written; a
    write that fails says so before the turn passes on."""
    async with write_turn:
        if failed.is_set():
            raise RebuildStopped(generation)
        try:
            if not await _still_rebuilding(redis, generation):
                raise RebuildAbandoned(generation)
            replies: list[object] = []
            for write in writes:  # each whole: its marks go with its keys
                replies.extend(await _write(redis, write, len(write)))
            return replies
        except BaseException:
            failed.set()
            raise


async def _write(
    redis: PipelinedRedis, commands: list[Command], per_write: int | None = None
) -> list[object]:
    """The commands in writes of `per_write` (COMMANDS_PER_WRITE unless given), each answered
    before the next is sent; the first error reply raised."""
    size = max(1, per_write if per_write is not None else COMMANDS_PER_WRITE)
    replies: list[object] = []
    for start in range(0, len(commands), size):
        for reply in await redis.execute_many(commands[start : start + size]):
            if isinstance(reply, Exception):
                raise reply
            replies.append(reply)
    return replies
