"""Rebuilds the hot quotas in Redis from the ledger in SQL (run at start-up and by command)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.errors import Unavailable
from authz_server.domain.model import QuotaFigures, Relationship
from authz_server.domain.types import RelationshipStatus, Scheme
from authz_server.runtime.reconcile_holds import (
    HoldFixes,
    holds_of_page,
    put_back_lost,
    tried_again,
    void_stale,
)
from authz_server.service.capture_recovery import settle_stalled
from authz_server.service.clock import Clock, system_clock
from authz_server.service.ports import QuotaCache, QuotaRestore
from authz_server.service.quota_sync import ledger_marks, on_loop, restore_of
from authz_server.storage.redis.hold_store import HoldStore
from authz_server.storage.redis.sweep_store import STALE_CAPTURE_SECONDS, SweepStore
from authz_server.storage.sql import records
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import (
    ParticipantRow,
    RelationshipRow,
)

log = logging.getLogger(__name__)
# Quotas per page: read under their row locks and restored before they are let go, so a page
# holds them (on SQLite the database's write lock) for one round of Redis restores, ~10-50 ms.
BATCH_SIZE = 500
# Quotas reconciled concurrently within a page (see reconcile()).
QUOTAS_IN_FLIGHT = 100


@dataclass(frozen=True)
class ReconcileReport:
    quotas: int
    # quotas whose Redis figures disagreed with the ledger, either way, and by how much
    drifted: int
    drift_fen: int
    # left as they were: a capture of theirs was between its phases, or their money moved
    # between the restore's read and its write (the next run sets them)
    busy: int = 0
    # of the drifted: those where Redis let (or would let) out more than the ledger has
    overstated: int = 0
    # a rolling page's quotas not set (a Redis call failed even when tried again, or a quota
    # after it in the page): the next pass tries them (reconcile_page with rolling=True)
    failed: int = 0
    # open holds SQL has and Redis had lost without a loss being noticed (an older copy
    # served): put back, each of their quotas counted drifted and overstated above
    holds_put_back: int = 0
    # holds SQL voided that Redis still held (a void's Redis step lost, an older copy): voided
    # in Redis, each of their quotas counted drifted (understated) above
    holds_voided: int = 0

    def plus(self, other: ReconcileReport) -> ReconcileReport:
        return ReconcileReport(
            quotas=self.quotas + other.quotas,
            drifted=self.drifted + other.drifted,
            drift_fen=self.drift_fen + other.drift_fen,
            busy=self.busy + other.busy,
            overstated=self.overstated + other.overstated,
            failed=self.failed + other.failed,
            holds_put_back=self.holds_put_back + other.holds_put_back,
            holds_voided=self.holds_voided + other.holds_voided,
        )


async def reconcile(
    database: Database,
    quotas: QuotaCache,
    holds: HoldStore | None = None,
    clock: Clock = system_clock,
) -> ReconcileReport:
    """Sets every active quota to the ledger's unused figure (keeping open holds). Counts quotas
    whose figure was different. Quotas of relationships no longer active are not visited: a
    dissolution whose Redis step was lost leaves its quota active in Redis (Authorize may
    approve on it; the ledger refuses its capture, RELATIONSHIP_NOT_ACTIVE) until the rolling
    reconcile's dissolutions cursor passes it (runtime/reconcile_dissolved.py) or a rebuild.

    It may run while servers serve (a new server's start, the reconcile Job, after a bulk
    load): each page of quotas is read under its row locks and restored before they are let go,
    and a quota with a capture between its phases is left as it is (`busy`).
    """
    if holds is not None:
        # The captures stalled between their phases: only those past STALE_CAPTURE_SECONDS, as
        # the sweeper does. Other servers may be serving (a rolling restart, the reconcile Job):
        # a younger claim may be live, its write still committing after SQL was read here.
        now_ms = int(clock().timestamp() * 1000)
        stalled = await SweepStore(holds.commands).stalled_captures(
            now_ms=now_ms, older_than_ms=STALE_CAPTURE_SECONDS * 1000
        )
        await settle_stalled(database, holds, stalled, now_ms)
    after = ""
    total = ReconcileReport(quotas=0, drifted=0, drift_fen=0)
    while True:
        after, report = await reconcile_page(database, quotas, after, holds=holds, clock=clock)
        total = total.plus(report)
        if not after:
            return total


async def reconcile_page(
    database: Database,
    quotas: QuotaCache,
    after: str,
    page_size: int = BATCH_SIZE,
    rolling: bool = False,
    holds: HoldStore | None = None,
    clock: Clock = system_clock,
) -> tuple[str, ReconcileReport]:
    """One page of reconcile(): up to `page_size` active quotas whose relationship ids come
    after `after`, read under their row locks and restored before those are let go (service/
    quota_sync.py says why). Returns (the page's last relationship id, or "" when no quota came
    after `after`: the pass is complete; what it found). A quota whose Redis call failed raises.

    `rolling` (runtime/rolling_reconcile.py: a page at a time while payments go on): rows
    another transaction has locked are skipped, not waited for (PostgreSQL's SKIP LOCKED: a
    page waiting on one busy row would hold the rows before it, and the payments waiting on
    those); they wait for the next pass, as do the quotas a failed Redis call left (counted in
    `failed`, not raised: one bad quota must not stop every pass at its page).

    `holds`: the holds Redis has wrong are set right too, around the quotas' restores
    (runtime/reconcile_holds.py: a hold SQL voided that Redis still holds, an open one Redis
    lost), counted as drift and logged. Redis lost or kept them without a loss being noticed:
    the sums agree, so the quotas alone show nothing, while the money is approved twice or
    held for nobody. A hold Redis fails on counts in `failed` when rolling, and raises else."""
    loop = asyncio.get_running_loop()

    def page(session: Session) -> tuple[str, list[Drift | BaseException | None], int, HoldFixes]:
        rows = session.execute(
            select(RelationshipRow, ParticipantRow.scheme)
            .join(ParticipantRow, ParticipantRow.participant_id == RelationshipRow.beneficiary_id)
            .where(
                RelationshipRow.relationship_id > after,
                RelationshipRow.status == RelationshipStatus.ACTIVE.value,
            )
            .order_by(RelationshipRow.relationship_id)
            .limit(page_size)
            .with_for_update(of=RelationshipRow, skip_locked=rolling)
        )
        batch = [(records.relationship(row), Scheme(scheme)) for row, scheme in rows]
        if not batch:
            return "", [], 0, HoldFixes()
        quotas_of_page = _restores(session, batch)
        if holds is None:
            drifts = on_loop(loop, _restore_page(quotas, quotas_of_page))
            return batch[-1][0].relationship_id, drifts, len(batch), HoldFixes()
        # The order matters (runtime/reconcile_holds.py): voids, quotas, put-backs.
        now = clock()
        found = holds_of_page(session, [relationship for relationship, _ in batch], now)
        fixes = on_loop(loop, void_stale(holds, found.voided, _ms(now)))
        drifts = on_loop(loop, _restore_page(quotas, quotas_of_page))
        if fixes.void_sent and found.other_quotas:  # their drift is the voided holds'
            # Every hold a void was sent for: one whose reply was lost may have been voided.
            voided_on = {rid for hold in fixes.void_sent for rid, _ in hold.funding}
            others = _restores_of(session, sorted(voided_on & set(found.other_quotas)))
            results = on_loop(loop, _restore_page(quotas, others))
            unset = sum(isinstance(result, BaseException) for result in results)
            fixes = fixes.plus(HoldFixes(failed=unset + len(others) - len(results)))
        fixes = fixes.plus(on_loop(loop, put_back_lost(holds, found.open, _ms(now))))
        return batch[-1][0].relationship_id, drifts, len(batch), fixes

    last, drifts, read, fixes = await database.run_locking(page)
    put_back, voided = fixes.put_back, fixes.voided
    drifted = drift_fen = busy = overstated = 0
    for hold in voided:
        log.error(
            "authorization %s: a hold SQL voided was still held in Redis (its void's Redis "
            "step lost, or an older copy served): voided",
            hold.authorization_id,
            extra={"authorization_id": hold.authorization_id},
        )
        drifted += len(hold.funding)
        drift_fen += hold.approved_fen
    for hold in put_back:
        log.error(
            "authorization %s: an open hold SQL has was missing from Redis (an older copy "
            "served without a loss being noticed?): put back",
            hold.authorization_id,
            extra={"authorization_id": hold.authorization_id},
        )
        drifted += len(hold.funding)
        overstated += len(hold.funding)
        drift_fen += hold.approved_fen
    if fixes.failed and not rolling:  # after the page and its log lines: not tried again
        raise Unavailable(f"{fixes.failed} holds Redis has wrong could not be set right")
    errors = [drift for drift in drifts if isinstance(drift, BaseException)]
    if rolling and errors:
        # _restore_page ends a page at its first failed group: the rest was not tried either.
        log.warning(
            "rolling reconcile: a quota of the page after %r not set (%s); the next pass tries "
            "it and the page's untried rest", after, errors[0],
        )  # fmt: skip
        drifts = [drift for drift in drifts if not isinstance(drift, BaseException)]
    for drift in drifts:
        if isinstance(drift, BaseException):
            raise drift
        if drift == _BUSY:
            busy += 1
        elif drift is not None:
            drifted += 1
            drift_fen += drift.fen
            overstated += drift.overstated
    report = ReconcileReport(
        quotas=len(drifts),
        drifted=drifted,
        drift_fen=drift_fen,
        busy=busy,
        overstated=overstated,
        failed=read - len(drifts) + fixes.failed,
        holds_put_back=len(put_back),
        holds_voided=len(voided),
    )
    return last, report


def _restores_of(session: Session, relationship_ids: list[str]) -> list[QuotaRestore]:
    """The restores of these quotas (locked by the caller), as the page's are built."""
    if not relationship_ids:
        return []
    rows = session.execute(
        select(RelationshipRow, ParticipantRow.scheme)
        .join(ParticipantRow, ParticipantRow.participant_id == RelationshipRow.beneficiary_id)
        .where(RelationshipRow.relationship_id.in_(relationship_ids))
        .order_by(RelationshipRow.relationship_id)
    )
    return _restores(session, [(records.relationship(row), Scheme(scheme)) for row, scheme in rows])


def _restores(session: Session, batch: list[tuple[Relationship, Scheme]]) -> list[QuotaRestore]:
    """Each quota's restore from its row (read under its lock) and its ledger mark."""
    marks = ledger_marks(session, [relationship.relationship_id for relationship, _ in batch])
    return [
        restore_of(relationship, scheme, marks.get(relationship.relationship_id, 0))
        for relationship, scheme in batch
    ]


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Drift:
    """How one quota's Redis figures disagreed with the ledger: by how many fen, and whether
    Redis overstated it (could let out money the ledger does not have)."""

    fen: int
    overstated: bool


def drift_of(before: QuotaFigures | None, after: QuotaFigures) -> Drift | None:
    """How Redis's figures `before` a restore disagreed with the ledger's, `after` it (None:
    they agreed). Every disagreement counts, understated or overstated:

    - the sums (available + held) differ. Only the sums are compared, not each figure: the
      reconcile may run while servers serve, and their calls move money between available and
      held (an Authorize, a void, an expiry) between the read and the restore, never in or out
      of the sum (that commits under the row lock the page holds);
    - a negative held before: no script leaves one, and it inflates available by as much
      with the sum unchanged (Redis let that much more be authorized). The amount is then what
      available was above the ledger's (a live call may have moved some of it meanwhile: the
      figure is an estimate, the drift is not). A negative available is not drift by itself:
      holds put back on money approved twice leave one (hold_restore.lua), and the restore
      keeps it (quota_restore.lua), so that each hold's release gives back what it holds;
    - a negative sum after: the ledger's unused figure is itself negative, more captured than
      allocated: money out that was not there.
    """
    total_after = after.available_fen + after.held_fen
    if before is None:  # Redis lacked the quota: everything unused was missing from it
        return Drift(fen=abs(total_after), overstated=total_after < 0)
    total_before = before.available_fen + before.held_fen
    fen = abs(total_before - total_after)
    negative = max(0, -before.held_fen, -total_after)
    if negative:
        fen = max(fen, negative, before.available_fen - after.available_fen)
    if fen == 0:
        return None
    return Drift(fen=fen, overstated=total_before > total_after or negative > 0)


# A quota left as it was because a capture of it was between its phases (quota_restore.lua);
# no drift is negative, so it equals none of them.
_BUSY = Drift(fen=-1, overstated=False)


async def _restore_page(
    quotas: QuotaCache, page: list[QuotaRestore]
) -> list[Drift | BaseException | None]:
    """QUOTAS_IN_FLIGHT at once: the pipelined connection sends their commands in a few writes
    instead of two round trips per quota (each quota is its own keys, so order is free). Not
    the whole page at once: 2,000 commands queued behind each other could outlast the
    per-command Redis timeout on a loaded machine. A group with a quota that failed even when
    tried again ends the page (the caller raises it): the page's row locks are not held through
    the rest of a Redis outage."""
    drifts: list[Drift | BaseException | None] = []
    for start in range(0, len(page), QUOTAS_IN_FLIGHT):
        drifts += await asyncio.gather(
            *(_reconcile_quota(quotas, quota) for quota in page[start : start + QUOTAS_IN_FLIGHT]),
            return_exceptions=True,
        )
        if any(isinstance(drift, BaseException) for drift in drifts):
            break
    return drifts


async def _reconcile_quota(quotas: QuotaCache, quota: QuotaRestore) -> Drift | None:
    """Sets one quota to the ledger's figure; returns how it was off (None: it was not;
    _BUSY: left as it was)."""
    before = await tried_again(
        lambda: quotas.figures(quota.beneficiary_id, [quota.relationship_id])
    )
    # Setting a quota from the ledger again is safe (quota_restore.lua recounts held from the
    # open holds and sets available from the ledger's figure, under the same row locks; the
    # try reads the quota's money version again, which a first try that was applied moved): a
    # reply lost to a timeout (which drops the connection's other commands with it) is tried
    # once more, not the start failed on one slow reply. The drift is measured from the figures
    # read before the first try, so it can be misreported when the first try was applied and
    # a capture moved between the two (an overstatement then reported as busy, or a capture's
    # finish as drift): rare (a lost reply and a capture of that quota within ~0.6 s), and
    # before, the start failed and the next one found nothing to report either.
    after = await tried_again(lambda: quotas.restore(quota))
    if after is None:
        return _BUSY
    return drift_of(before.get(quota.relationship_id), after)
