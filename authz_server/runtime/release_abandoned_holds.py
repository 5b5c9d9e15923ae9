"""The rolling reconcile's third step: holds in Redis that nobody was ever told of are released.

An Authorize places its hold in Redis (lua/authorize.lua), commits its decision row to the SQL
journal, and only then answers the till; a retry with its idempotency key is answered the same
way (service/authorization.py _answer). A process that died between the two, or a Redis reply
that timed out after the script ran, leaves a hold in Redis only; if the till gave up, nothing
journals it (the late journal, service/late_journal.py, only has rows whose call got that far),
and it holds the family's money, other payments declined INSUFFICIENT_QUOTA, until it expires:
15 minutes at a pharmacy, a day otherwise. A quota restore keeps open holds, so no reconcile
freed it either.

So after each page of quotas (runtime/rolling_reconcile.py), the holds on that page's quotas are
read; those PENDING for longer than MEDWALLET_ABANDONED_HOLD_SECONDS with no journal row
(domain/abandoned_holds.py) are settled by SQL's unique (merchant, idempotency key), never by a
guess: in one transaction a DECLINED row (DECLINE_REASON_HOLD_ABANDONED, a new authorization id
of the same slot) goes in under the hold's key unless the key has a row already, and the key's
row is read back. Only when SQL holds another decision than the hold's own is the hold released
(lua/authorize_undo.lua, as a call whose key SQL answered otherwise undoes its own). A till
retrying with the key meets that row in the journal whichever comes first (its replay's row,
or the decision it makes anew once the hold and its record are gone, conflicts, is undone, and
the stored decline is answered): never an approval of money released. A retry that journaled
the hold first keeps it (the insert finds its row), as does the late journal.

Bounded: the page's quotas (PAGE_SIZE), HOLDS_READ_PER_QUOTA holds of each and
HOLDS_READ_PER_PAGE in all (drawn at random when there are more), RELEASED_PER_PAGE at most;
the rest waits for the next pass. A pass over Q quotas
takes Q / MEDWALLET_RECONCILE_QUOTAS_PER_SECOND, so a hold is released between the grace and
the grace plus a pass after it was placed (with the pace at 0, at its expiry, as before). Left
alone: holds placed before holds kept their key (they expire as before), one-step payments (the
sweeper settles them as SQL says) and holds a rebuild put back (SQL has them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from authz_server.domain.abandoned_holds import (
    FirstCall,
    HoldInRedis,
    abandoned,
    unconfirmed_for_long,
)
from authz_server.domain.types import AuthorizationStatus, Decision, DeclineReason
from authz_server.observability import metrics
from authz_server.service.authorization import (
    AuthorizeOutcome,
    Serializable,
    declined_lines,
    decode_lines,
)
from authz_server.service.clock import Clock, system_clock
from authz_server.storage.redis import keys
from authz_server.storage.redis.unconfirmed_holds import UnconfirmedHolds
from authz_server.storage.sql.abandoned_hold_rows import (
    active_quotas_between,
    decline_in_their_place,
    journaled_ids,
)
from authz_server.storage.sql.database import Database

log = logging.getLogger(__name__)
# Holds read per quota, and per page: a family has a handful open on one quota, all read each
# pass; a quota (or a page) with more has this many drawn at random each pass, so one pipelined
# write stays far below what could outlast the Redis timeout behind it.
HOLDS_READ_PER_QUOTA = 200
HOLDS_READ_PER_PAGE = 1_000
# Releases per page at most (one row each in one transaction, one script each): after a crash
# the few holds its calls left are spread over the families' pages.
RELEASED_PER_PAGE = 50
# Quotas read per page at most: the rolling page's range holds PAGE_SIZE of them (50); a bound
# should the range ever be wider.
QUOTAS_PER_PAGE = 1_000
REASON = DeclineReason.HOLD_ABANDONED


# The transport's answer to an Authorize (server/authorization_handler.py authorize_response):
# the declined answer stored for the key is the one a retry of its till gets.
Respond = Callable[[AuthorizeOutcome], Serializable]


async def release_abandoned_holds(
    database: Database,
    holds: UnconfirmedHolds,
    after: str,
    through: str,
    grace_seconds: int,
    respond: Respond,
    clock: Clock = system_clock,
) -> int:
    """Releases the abandoned holds on the active quotas whose relationship ids come after
    `after`, up to `through` included (the rolling page just reconciled). Returns how many it
    released. Raises Unavailable when Redis or SQL does not answer: a later pass looks again
    (a decline committed whose release failed is found then, and the release made)."""
    if not through:
        return 0
    quotas = await database.run(
        lambda session: active_quotas_between(session, after, through, QUOTAS_PER_PAGE)
    )
    now = clock()
    now_ms = int(now.timestamp() * 1000)
    candidates = unconfirmed_for_long(
        await holds.on_quotas(quotas, HOLDS_READ_PER_QUOTA, HOLDS_READ_PER_PAGE),
        now_ms,
        grace_seconds,
    )
    if not candidates:
        return 0
    ids = [hold.authorization_id for hold in candidates]
    journaled = await database.run(lambda session: journaled_ids(session, ids))
    found = abandoned(candidates, journaled)
    first_calls = await holds.first_calls(found)
    # A hold whose key's record no longer names it: its first call is not known (the digest a
    # retry must match), so it is left to expire. Left out before the page's bound is applied:
    # such holds, read in the same order every pass, would otherwise take the bound each time
    # and keep a releasable hold later in the page waiting until its expiry.
    found = [hold for hold in found if hold.authorization_id in first_calls][:RELEASED_PER_PAGE]
    released = 0
    for hold in found:
        row = _declined_row(hold, first_calls[hold.authorization_id], respond, now)
        # One transaction a hold: it holds one key's index entry at a time, so it cannot
        # deadlock with a journal batch inserting the same keys in another order (PostgreSQL).
        keyed = await database.run_core(partial(decline_in_their_place, rows=[row]))
        held_by = keyed.get((hold.merchant_id, hold.idempotency_key))
        if held_by == hold.authorization_id:
            continue  # journaled meanwhile (a retry, the late journal): an ordinary hold now
        if not await holds.release(hold):
            continue  # released already (another page or server), or undone by a retry
        released += 1
        metrics.abandoned_holds_released.inc()
        decline = (
            f"DECLINED {REASON.value}" if held_by == row["authorization_id"] else "another decision"
        )
        log.warning(
            "authorization %s: its hold of %d fen at merchant %s was never confirmed (no journal "
            "row %d s after it was placed); released, its idempotency key answered by %s (%s)",
            hold.authorization_id, hold.approved_fen, hold.merchant_id,
            (now_ms - hold.created_ms) // 1000, held_by, decline,
            extra={"authorization_id": hold.authorization_id},
        )  # fmt: skip
    return released


def _declined_row(
    hold: HoldInRedis, first: FirstCall, respond: Respond, now: datetime
) -> dict[str, Any]:
    """The journal row that answers the hold's key DECLINED: a new authorization id in the
    beneficiary's slot, the first call's request digest (a retry of the same request is told
    the decline, another request IDEMPOTENCY_KEY_REUSED), nothing approved, held or expiring."""
    authorization_id = keys.new_authorization_id(hold.beneficiary_id)
    outcome = AuthorizeOutcome(
        authorization_id=authorization_id,
        decision=Decision.DECLINED,
        decline_reason=REASON,
        approved_fen=0,
        lines=declined_lines(decode_lines(first.template), REASON),
        funding=(),
        remaining_fen=0,  # not known here, and stale by the time a retry reads it
        expires_at=None,
        status=AuthorizationStatus.DECLINED,
    )
    return {
        "authorization_id": authorization_id,
        "merchant_id": hold.merchant_id,
        "beneficiary_id": hold.beneficiary_id,
        "purpose": hold.purpose,
        "decision": Decision.DECLINED.value,
        "decline_reason": REASON.value,
        # The request's amount is not kept in Redis; what the hold took stands in (the column
        # is a record, read by nothing).
        "requested_fen": hold.approved_fen,
        "approved_fen": 0,
        "funding": "",
        "idempotency_key": hold.idempotency_key,
        "request_digest": first.request_digest,
        "response": respond(outcome).SerializeToString(),
        "created_at": now,
        "expires_at": None,
    }
