"""The holds a reconcile page sets right in Redis, besides its quotas (runtime/reconcile.py).

The quotas' figures alone cannot show a hold Redis has wrong while the sums agree: an older copy
served without a loss being noticed (restored by hand, a slot copied back), or a void's Redis
step lost after its commit. So each page, under its row locks:
1. voids in Redis the holds SQL voided over VOID_SETTLED_SECONDS ago that Redis still has
   PENDING (their money was held until they expired, up to 24 h, and payments declined on it);
2. then sets the page's quotas, and the voided holds' other quotas that are active in SQL
   (quota_restore.lua recounts held from the holds Redis has pending: after the voids, those
   no longer count);
3. then puts back the open holds SQL has and Redis does not know at all (hold_restore.lua
   places nothing on a quota it lacks, and a copy may lack one: the quotas come first). A hold
   put back on money Redis approved twice meanwhile leaves available below zero; later passes
   keep it so (quota_restore.lua keeps held at the holds' sum, above unused), and each of the
   quota's holds gives back exactly what it holds when released; the ledger refuses any
   capture beyond the quota.
Each hold is touched only while this transaction holds the row lock of every quota it draws
on: the page's, and the others it could lock without waiting (SKIP LOCKED: they come outside
the page's id order, and waiting could deadlock with a capture batch; a hold one of whose quotas
is busy waits for the next pass). A capture or a void of them commits under those locks, so
what SQL says of them cannot change before Redis is set.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.errors import Unavailable
from authz_server.domain.hot_state import APPROVALS, OpenHold
from authz_server.domain.model import Relationship
from authz_server.domain.types import RelationshipStatus
from authz_server.service.ports import HoldStatus, VoidOutcome
from authz_server.storage.redis import keys
from authz_server.storage.redis.hold_store import HoldStore
from authz_server.storage.redis.pipelined import Reply
from authz_server.storage.redis.quota_cache import guarded
from authz_server.storage.sql.open_holds import HOLD_COLUMNS, hold_of, open_holds
from authz_server.storage.sql.tables import AuthorizationRow, RelationshipRow

log = logging.getLogger(__name__)
T = TypeVar("T")
# A void's Redis step follows its commit within milliseconds (or waits out a rebuild, up to
# quota_sync.REBUILD_WAIT_SECONDS): a hold voided in SQL longer ago and still PENDING in Redis
# had that step lost. Younger ones are left to it (and to the next pass).
VOID_SETTLED_SECONDS = 30
# How long a Redis call of these waits before its one more try (a dropped connection).
RETRY_AFTER_SECONDS = 0.1


@dataclass(frozen=True)
class PageHolds:
    """What SQL says of a page's holds, read under its locks."""

    # open in SQL: put back where Redis does not know them
    open: list[OpenHold] = field(default_factory=list)
    # voided in SQL over VOID_SETTLED_SECONDS ago, not expired: voided where Redis has them
    # PENDING
    voided: list[OpenHold] = field(default_factory=list)
    # the voided holds' quotas outside the page, locked here and active in SQL: set after the
    # voids, as the page's are (not counted as the page's)
    other_quotas: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HoldFixes:
    """What a page did to holds Redis had wrong, and how many it could not look at or set
    right (a Redis call failed even when tried again: the next pass tries them)."""

    put_back: list[OpenHold] = field(default_factory=list)
    voided: list[OpenHold] = field(default_factory=list)
    failed: int = 0
    # the holds a void was sent for, voided or not (its reply may be lost after it was done)
    void_sent: list[OpenHold] = field(default_factory=list)

    def plus(self, other: HoldFixes) -> HoldFixes:
        return HoldFixes(
            [*self.put_back, *other.put_back],
            [*self.voided, *other.voided],
            self.failed + other.failed,
            [*self.void_sent, *other.void_sent],
        )


def holds_of_page(session: Session, page: list[Relationship], now: datetime) -> PageHolds:
    page_ids = {relationship.relationship_id for relationship in page}
    beneficiaries = sorted({relationship.beneficiary_id for relationship in page})
    # The page's quotas were read active under their locks: not read again for each hold.
    active = dict.fromkeys(page_ids, True)
    candidates = open_holds(session, now, beneficiary_ids=beneficiaries, known_active=active)
    voided = _voided_holds(session, beneficiaries, now)
    others = sorted({rid for hold in [*candidates, *voided] for rid, _ in hold.funding} - page_ids)
    if not others:
        return PageHolds(candidates, voided)  # read under the page's locks already
    locked = page_ids | set(
        session.scalars(
            select(RelationshipRow.relationship_id)
            .where(RelationshipRow.relationship_id.in_(others))
            .with_for_update(skip_locked=True)
        )
    )

    def all_locked(hold: OpenHold) -> bool:
        return all(rid in locked for rid, _ in hold.funding)

    wanted = {hold.authorization_id for hold in candidates if all_locked(hold)}
    # Read again once locked (a void is final: the voided ones need not be).
    still_open = [
        hold
        for hold in open_holds(session, now, beneficiary_ids=beneficiaries, known_active=active)
        if hold.authorization_id in wanted
    ] if wanted else []  # fmt: skip
    voided = [hold for hold in voided if all_locked(hold)]
    # Set again after the voids: the voided holds' other quotas, only those active in SQL. One
    # dissolved in SQL whose Redis step was lost is the dissolutions' cursor's to mend (a
    # restore would write it DISSOLVED without voiding its holds, and the cursor skip it).
    other_quotas = sorted(
        set(
            session.scalars(
                select(RelationshipRow.relationship_id).where(
                    RelationshipRow.relationship_id.in_(
                        sorted({rid for hold in voided for rid, _ in hold.funding} - page_ids)
                    ),
                    RelationshipRow.status == RelationshipStatus.ACTIVE.value,
                )
            )
        )
    )
    return PageHolds(still_open, voided, other_quotas)


def _voided_holds(session: Session, beneficiaries: list[str], now: datetime) -> list[OpenHold]:
    rows = session.execute(
        select(*HOLD_COLUMNS).where(
            AuthorizationRow.beneficiary_id.in_(beneficiaries),
            AuthorizationRow.decision.in_(sorted(APPROVALS)),
            AuthorizationRow.expires_at > now,
            AuthorizationRow.voided_at < now - timedelta(seconds=VOID_SETTLED_SECONDS),
        )
    ).all()
    return [hold_of(row) for row in rows]


async def void_stale(holds: HoldStore, voided: list[OpenHold], now_ms: int) -> HoldFixes:
    """Voids in Redis those it still has PENDING (void.lua: their money back to available)."""
    states, failed = await _states(holds, voided)
    pending = [hold for hold, state in zip(voided, states, strict=True) if state == _PENDING]
    outcomes = await asyncio.gather(
        *(
            tried_again(
                functools.partial(holds.void, hold.authorization_id, hold.merchant_id, now_ms)
            )
            for hold in pending
        ),
        return_exceptions=True,
    )
    done = [hold for hold, outcome in zip(pending, outcomes, strict=True) if outcome is _VOIDED]
    return HoldFixes(voided=done, failed=failed + _failures(outcomes), void_sent=pending)


async def put_back_lost(holds: HoldStore, open_in_sql: list[OpenHold], now_ms: int) -> HoldFixes:
    """Puts back those Redis does not know at all (hold_restore.lua)."""
    states, failed = await _states(holds, open_in_sql)
    missing = [hold for hold, state in zip(open_in_sql, states, strict=True) if state is None]
    placed = await asyncio.gather(
        *(tried_again(functools.partial(holds.restore_hold, hold, now_ms)) for hold in missing),
        return_exceptions=True,
    )
    done = [hold for hold, was_placed in zip(missing, placed, strict=True) if was_placed is True]
    return HoldFixes(put_back=done, failed=failed + _failures(placed))


_PENDING = HoldStatus.PENDING.value.encode()
_VOIDED = VoidOutcome.OK
# An answer of _states for a hold it could not read: neither missing (None) nor PENDING.
_UNREAD = b"?"


async def _states(holds: HoldStore, of: list[OpenHold]) -> tuple[list[Reply], int]:
    """Each hold's status in Redis (None: Redis does not know it), and how many could not be
    read (_UNREAD in their place)."""
    if not of:
        return [], 0
    commands = [("HGET", keys.authorization(hold.authorization_id), "s") for hold in of]
    try:
        replies = await tried_again(lambda: guarded(lambda: holds.commands.execute_many(commands)))
    except Unavailable as error:
        log.warning("reconcile: holds not read from Redis: %s", error)
        return [_UNREAD] * len(of), len(of)
    unread = [isinstance(reply, Exception) for reply in replies]
    for reply in replies:
        if isinstance(reply, Exception):
            log.warning("reconcile: a hold not read from Redis: %s", reply)
    return [_UNREAD if bad else reply for bad, reply in zip(unread, replies, strict=True)], sum(
        unread
    )


def _failures(results: Sequence[object]) -> int:
    failed = [result for result in results if isinstance(result, BaseException)]
    for failure in failed:
        log.warning("reconcile: a hold Redis had wrong was not set right: %s", failure)
    return len(failed)


async def tried_again(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, once more after RETRY_AFTER_SECONDS when Redis did not answer (Unavailable)."""
    try:
        return await call()
    except Unavailable:
        await asyncio.sleep(RETRY_AFTER_SECONDS)
        return await call()
