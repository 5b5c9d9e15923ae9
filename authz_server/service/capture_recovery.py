"""Settling captures that stopped between their phases: finished as SQL, the record, says.

A capture claims its hold in Redis (CAPTURING), writes SQL, then finishes the hold. If the
process dies or loses the Redis reply in between, the hold stays CAPTURING: neither void nor
expiry may take it, because SQL may already count it captured. Here it is finished as SQL says:
CAPTURED with the parts SQL has, or back to PENDING when SQL has nothing (the merchant may retry;
a one-step payment is voided instead, and a retry with its key pays anew).
Called at start-up (reconcile), by the sweeper for captures stalled past STALE_CAPTURE_SECONDS,
and by a same-key retry that finds its own capture stalled.

A hold a rebuild put back (PENDING, rs = 1) lost its claim with Redis: a capture claimed before
the loss may commit after the rebuild read SQL, and its process die before finishing the hold.
The rebuild lists every hold it puts back with the stalled captures (no trace of a claim is in
SQL, so it cannot tell which), and expiry does not release one while it is listed (up to its
bound; lua/_lib.lua awaiting_settlement). Here it is settled as SQL says too: CAPTURED as
above, or, when SQL has no capture, simply no longer listed (an ordinary open hold, expiring at
its time; a capture that commits even later finds it PENDING and finishes it, or, expired,
sets the quotas from the ledger: Captures.finish_hold_captured). A rebuild lists all
its open holds at once, so these are settled a batch at a time (settle_stalled: one SQL read for
a batch's put-back holds, their Redis steps at once).

A claim is settled only once stale: the caller found it stalled, but a till's retry may have
settled it and claimed the hold anew before its turn came; a claim younger than
STALE_CAPTURE_SECONDS is finished only as SQL's capture, else left to its own finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Sequence
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.observability import metrics
from authz_server.service.ports import (
    NOT_WRITTEN,
    STALE_CAPTURE_SECONDS,
    Finish,
    FinishReply,
    HoldRecord,
    HoldStatus,
    HoldStore,
)
from authz_server.storage.sql import records
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.open_holds import ledger_parts_of
from authz_server.storage.sql.tables import RelationshipRow

log = logging.getLogger(__name__)
# Holds a rebuild put back, settled a batch at a time: their Redis reads and writes at once, and
# one SQL transaction for all (a rebuild lists every open hold it puts back: a province's
# hundreds of thousands, each its own transaction before, kept the sweeper busy for minutes, its
# expiries waiting, and the SQL thread with it). The bound: the batch's quotas stay locked for
# its read (a capture of one of them waits that long), and its Redis calls go at once.
SETTLE_BATCH_HOLDS = 200
T = TypeVar("T")


def captured_as_sql_says(
    session: Session, authorization_id: str, relationship_ids: Iterable[str]
) -> str | None:
    """`ledger_parts`, read after every capture of these quotas still committing has ended
    (captured_of_as_sql_says)."""
    return captured_of_as_sql_says(session, [authorization_id], relationship_ids).get(
        authorization_id
    )


def captured_of_as_sql_says(
    session: Session, authorization_ids: Sequence[str], relationship_ids: Iterable[str]
) -> dict[str, str]:
    """`ledger_parts_of` these authorizations, read after every capture of these quotas (all
    those funding them) still committing has ended: their row locks are taken first, in id
    order as everywhere (on SQLite the transaction holds the database's write lock already).
    Without them, a capture whose COMMIT is in flight would read as absent, and its hold be
    given back while SQL counts the money as spent."""
    session.scalars(
        records.locked(
            select(RelationshipRow.relationship_id)
            .where(RelationshipRow.relationship_id.in_(sorted(set(relationship_ids))))
            .order_by(RelationshipRow.relationship_id)
        )
    ).all()
    return ledger_parts_of(session, authorization_ids)


async def finish_captured(
    database: Database, holds: HoldStore, authorization_id: str, claim_token: str, parts: str
) -> FinishReply:
    """Finishes the claim `claim_token` names ('' any) as CAPTURED with SQL's `parts`. A hold a
    rebuild put back (its claim lost with Redis) asks for the capture's ledger entries first:
    only they tell, against each quota's restore mark, whether a quota restore since the
    capture committed counted it as spent already (lua/capture_finish.lua). So SQL is read once
    more on that rare path only, never for a hold finished in its own claim. Never answers
    ENTRIES_NEEDED; FINISHED_UNDERSTATED is logged here (the caller may set the quotas from the
    ledger; reconcile does otherwise)."""
    finished = await holds.capture_finish(authorization_id, claim_token, Finish.CAPTURED, parts)
    if finished is FinishReply.ENTRIES_NEEDED:
        entries = await database.run(
            lambda session: records.capture_entries(session, authorization_id)
        )
        finished = await holds.capture_finish(
            authorization_id, claim_token, Finish.CAPTURED, parts, capture_entries=entries
        )
    if finished is FinishReply.FINISHED_UNDERSTATED:
        log.warning(
            "capture %s: a funding quota with too many holds to recount was left understated; "
            "it is set from the ledger by the capture or the next reconcile",
            authorization_id,
            extra={"authorization_id": authorization_id},
        )
    return finished


async def settle_capture(
    database: Database, holds: HoldStore, authorization_id: str, now_ms: int
) -> None:
    """Finishes a hold still CAPTURING as SQL says: CAPTURED with SQL's parts; when SQL has
    nothing, PENDING again, or VOIDED (NOT_WRITTEN) for a one-step payment, which nobody would
    capture later (its caller never got its id), so its money is freed at once. But a claim
    begun less than STALE_CAPTURE_SECONDS before `now_ms` is live (its write may be committing):
    finished only as CAPTURED, else left to its own finish. The caller found the hold stalled,
    and a till's retry may have settled it and claimed it anew since (an audit: the sweeper then
    finished the new claim PENDING, its capture committed after, and Redis kept the hold held
    while SQL counted it captured). A hold a rebuild put back, still PENDING: settle_put_back.
    Any other (finished meanwhile) only leaves the sweeper's list, if a rebuild left it there
    (voided or dissolved since)."""
    hold = await holds.get(authorization_id)
    if hold is not None and hold.status is HoldStatus.PENDING and hold.put_back:
        await settle_put_back(database, holds, {authorization_id: hold})
        return
    if hold is None or hold.status is not HoldStatus.CAPTURING:
        await holds.clear_capture(authorization_id, hold.expires_ms if hold else 0)
        return
    claim_token = hold.claim_token  # the claim read here is the one finished, or none
    funding = hold.funding
    captured = await database.run(
        lambda session: captured_as_sql_says(
            session, authorization_id, (relationship_id for relationship_id, _ in funding)
        )
    )
    if captured is not None:
        await finish_captured(database, holds, authorization_id, claim_token, captured)
        outcome = "captured"
    elif claim_is_live(claim_token, now_ms):
        outcome = "live"  # its own finish, or the sweeper once it is stale, settles it
    elif hold.one_step:
        await holds.capture_finish(authorization_id, claim_token, Finish.VOIDED, "", NOT_WRITTEN)
        outcome = "not_captured"
    else:
        await holds.capture_finish(authorization_id, claim_token, Finish.PENDING, "")
        outcome = "not_captured"
    metrics.captures_settled.labels(outcome).inc()


def claim_is_live(claim_token: str, now_ms: int) -> bool:
    """Whether a claim (its token: when it began, in ms, capture_begin.lua's cs) began less
    than STALE_CAPTURE_SECONDS before now_ms."""
    try:
        began_ms = int(claim_token)
    except ValueError:
        return False  # no readable start: as before, settled as SQL says
    return now_ms - began_ms < STALE_CAPTURE_SECONDS * 1000


async def settle_stalled(
    database: Database, holds: HoldStore, stalled: list[str], now_ms: int
) -> int:
    """Settles these authorizations (found CAPTURING, or put back by a rebuild, by a scan) as
    SQL says, SETTLE_BATCH_HOLDS at a time: the put-back holds still PENDING of a batch
    together (settle_put_back), the others one by one (settle_capture: a claim left
    CAPTURING is rare, and its own finish is read with it). One that fails (Redis or SQL did not
    answer) stays listed for the next round; the others go on, and the first failure is raised
    at the end: one bad hold must not hold back a rebuild's hundreds of thousands."""
    failures: list[Exception] = []
    for start in range(0, len(stalled), SETTLE_BATCH_HOLDS):
        batch = stalled[start : start + SETTLE_BATCH_HOLDS]
        found = await _noting(failures, asyncio.gather(*(holds.get(each) for each in batch)))
        if found is None:
            continue
        put_back = {
            authorization_id: hold
            for authorization_id, hold in zip(batch, found, strict=True)
            if hold is not None and hold.status is HoldStatus.PENDING and hold.put_back
        }
        await _noting(failures, settle_put_back(database, holds, put_back))
        for authorization_id in batch:
            if authorization_id not in put_back:
                await _noting(failures, settle_capture(database, holds, authorization_id, now_ms))
    if failures:
        raise failures[0]
    return len(stalled)


async def _noting(failures: list[Exception], step: Awaitable[T]) -> T | None:
    """await step; an exception is noted in `failures` (None then), for the caller to raise
    once the rest is done."""
    try:
        return await step
    except Exception as error:
        failures.append(error)
        return None


async def settle_put_back(
    database: Database, holds: HoldStore, put_back: dict[str, HoldRecord]
) -> None:
    """Settles holds a rebuild put back (read PENDING, rs = 1) as SQL says, read in one
    transaction after every capture of their quotas still committing has ended
    (captured_of_as_sql_says): CAPTURED with SQL's parts (finish_captured, which compares each
    quota's restore mark with the capture's ledger entries), else an ordinary open hold from
    now on (clear_capture), expiring at its own time. A capture that claimed one meanwhile
    (CAPTURING) is left to its own finish, or to the sweeper's settlement of that claim. The
    Redis steps go at once; one that fails leaves its hold listed (the sweeper's next round
    takes it again), and the first failure is raised once the others are done."""
    if not put_back:
        return
    authorization_ids = sorted(put_back)
    relationship_ids = sorted(
        {relationship_id for hold in put_back.values() for relationship_id, _ in hold.funding}
    )
    # Many quotas' locks at once: tried again after a deadlock (run_locking: a writer outside
    # the lock order, README "One lock order for quotas").
    captured = await database.run_locking(
        lambda session: captured_of_as_sql_says(session, authorization_ids, relationship_ids)
    )
    steps = [
        # '' finishes whichever claim there is: SQL has the capture, so a claim made meanwhile
        # is refused in SQL (or replayed) and finds the hold finished.
        finish_captured(database, holds, authorization_id, "", captured[authorization_id])
        if authorization_id in captured
        else holds.clear_capture(authorization_id, put_back[authorization_id].expires_ms)
        for authorization_id in authorization_ids
    ]
    results = await asyncio.gather(*steps, return_exceptions=True)
    failures = [result for result in results if isinstance(result, BaseException)]
    for authorization_id, result in zip(authorization_ids, results, strict=True):
        if isinstance(result, BaseException):
            continue
        # clear_capture answers False when a capture claimed the hold meanwhile: left to it.
        outcome = "captured" if authorization_id in captured else "not_captured"
        metrics.captures_settled.labels("live" if result is False else outcome).inc()
    if failures:
        raise failures[0]
