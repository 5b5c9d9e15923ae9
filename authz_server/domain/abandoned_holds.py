"""Which holds in Redis no till was ever told of, and may be released: the rule, pure (no I/O).

An Authorize places its hold in Redis, then commits its decision row to the SQL journal, and
only then answers the till (service/authorization.py); a retry with the same idempotency key is
answered the same way. So nobody was ever answered APPROVED for a hold that has no journal row.
A process that died between the two (or a Redis reply that timed out after the script ran) with
a till that gave up leaves such a hold holding the family's money until it expires (a day for a
medical hold), SQL knowing nothing. Once it is older than a grace period and SQL still has no
row of it, runtime/release_abandoned_holds.py has SQL's unique (merchant, idempotency key)
decide: a DECLINED row in its place, and the hold released only if SQL then holds that decline
(or any other decision but the hold's own) for the key.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from authz_server.domain.types import AuthorizationStatus

# The least grace (MEDWALLET_ABANDONED_HOLD_SECONDS) a server starts with: a hold younger may
# still be journaled by its own call (a commit behind a slow batch) or by the late journal
# (service/late_journal.py: a minute from the call's failed write, checked after each try, and
# a try may wait 30 s for SQLite's busy timeout or the ledger writer's frame, as may the call's
# own write before it hands the row on: ~2 minutes in all), and releasing it would turn a
# payment that is merely late into a decline (SQL's unique key keeps the money right either
# way). A minute of margin over that.
MIN_ABANDONED_HOLD_SECONDS = 180
DEFAULT_ABANDONED_HOLD_SECONDS = 300


@dataclass(frozen=True)
class HoldInRedis:
    """An authorization hash as the hot state has it, with what the release needs."""

    authorization_id: str
    merchant_id: str
    beneficiary_id: str
    purpose: str
    status: str
    approved_fen: int
    created_ms: int
    # When a till's retry last replayed it (0: none did): a till that asks again has not given
    # up, though its replay's row did not commit either (SQL down): the grace runs from then.
    asked_again_ms: int
    expires_ms: int
    # The Authorize's idempotency key; '' on a hold placed before holds kept it, or put back
    # by a rebuild: such a hold is left to expire (nothing to put a decline under).
    idempotency_key: str
    one_step: bool  # a one-step payment: the sweeper settles it as SQL says, never this
    put_back: bool  # put back from SQL by a rebuild: SQL has it


@dataclass(frozen=True)
class FirstCall:
    """What the key's record in Redis says of the call that placed a hold: its request's digest
    (a retry of the same request must find the decline, not IDEMPOTENCY_KEY_REUSED) and its
    line template (service/authorization.py encode_lines), for the declined answer's lines."""

    request_digest: str
    template: str


def checked_abandoned_hold_seconds(seconds: int) -> int:
    """The grace (0: no hold is released, as before the release was built: an operator's
    switch that leaves the rolling reconcile on), or ValueError naming the setting when it is
    under the minimum."""
    if seconds != 0 and seconds < MIN_ABANDONED_HOLD_SECONDS:
        raise ValueError(
            f"MEDWALLET_ABANDONED_HOLD_SECONDS must be 0 (off) or at least "
            f"{MIN_ABANDONED_HOLD_SECONDS} (longer than the late journal's minute, with a "
            f"margin), not {seconds!r}"
        )
    return seconds


def unconfirmed_for_long(
    holds: Iterable[HoldInRedis], now_ms: int, grace_seconds: int
) -> list[HoldInRedis]:
    """The holds that may be abandoned, before SQL is asked: PENDING, placed (and last asked
    for by a retry) more than the grace ago, not yet due to expire (expiry frees those anyway),
    with their key, not one-step payments (CAPTURING from their start) and not put back from
    SQL."""
    placed_before_ms = now_ms - grace_seconds * 1000
    return [
        hold
        for hold in holds
        if hold.status == AuthorizationStatus.PENDING.value
        and max(hold.created_ms, hold.asked_again_ms) < placed_before_ms
        and hold.expires_ms > now_ms
        and hold.idempotency_key
        and not hold.one_step
        and not hold.put_back
    ]


def abandoned(
    candidates: Iterable[HoldInRedis], journaled_ids: Collection[str]
) -> list[HoldInRedis]:
    """Of `unconfirmed_for_long`'s holds, those whose authorization SQL has no row of."""
    return [hold for hold in candidates if hold.authorization_id not in journaled_ids]
