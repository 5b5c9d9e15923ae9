"""The rolling reconcile (MEDWALLET_RECONCILE_QUOTAS_PER_SECOND): while the deployment serves,
its quotas are set from SQL a page at a time, one server per page, at a steady pace.

A reconcile at start-up and the on-demand Job set Redis from SQL after a known fault; the
faults nobody notices (a race the scripts' fences do not cover, an operator's stray command, a
bug) would leave a quota's figure off until the next one. So the servers take turns (keys.
RECONCILE_TURN, a key with an expiry: the page interval) at reconciling the next page of quotas
after the cursor they share (keys.RECONCILE_CURSOR), each page read under its row locks and set
before they are let go (runtime/reconcile.py reconcile_page); what a page finds counts as drift
(medwallet_reconcile_drift_total, whose alert then fires). At the end of the quotas the cursor
starts over. A full pass over Q quotas takes Q / the pace: the pace, not the size of the
province, bounds what it costs (one page of PAGE_SIZE quotas every PAGE_SIZE / pace seconds,
on one server at a time). A page skips rows other transactions hold and counts quotas Redis
failed on (medwallet_reconcile_failures_total): both wait for the next pass.

The same turn then follows a second cursor (keys.RECONCILE_DISSOLVED_CURSOR) through the
relationships dissolved since, a page at most, dissolving in Redis any quota still active there
(runtime/reconcile_dissolved.py says why): the quota pages visit active relationships only.
Last, it releases the holds on the page's quotas that no till was ever told of, placed longer
than MEDWALLET_ABANDONED_HOLD_SECONDS ago and never journaled (runtime/
release_abandoned_holds.py says why and how).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable

from authz_server.domain.errors import Unavailable
from authz_server.observability import metrics
from authz_server.runtime.reconcile import ReconcileReport
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import PipelinedRedis

log = logging.getLogger(__name__)
# Quotas per rolling page: a page holds its rows' locks (on SQLite the database's write lock,
# which every journal and capture commit waits for) through a round of Redis calls per quota:
# 500, the start-up reconcile's page, stalled SQL writes 55-145 ms; 50 keeps a page's stall
# near a tenth of that at the same pace (loadtest/RESULTS.md, "A rolling reconcile").
PAGE_SIZE = 50
# The most quotas a second the pace may ask (MEDWALLET_RECONCILE_QUOTAS_PER_SECOND): a page
# every 10 ms; above it the rolling reconcile would keep SQLite's write lock most of the time.
MAX_QUOTAS_PER_SECOND = 5_000.0
# A pass-ended line at most this often (a small province ends a pass every few pages).
PASS_LOG_SECONDS = 600.0
# Each server waits the page interval times a random factor in this range between looks:
# servers started together do not all ask for the turn at the same moment.
JITTER = (0.9, 1.1)
# While a page runs, its turn lasts this long (a page takes ~10-20 ms, more on a loaded
# machine): no other server starts a page meanwhile. Once it ends, the turn is set to end this
# share of a page interval later (the pace): not the whole interval, or this server's own next
# look (JITTER's lower bound) would find its own turn still held half of the time.
TURN_WHILE_RUNNING_SECONDS = 10.0
TURN_SHARE_OF_INTERVAL = 0.9
# Hands the turn on: sets KEYS[1] to expire in ARGV[2] ms if it still holds this server's token
# ARGV[1] (1 when it did). Not a plain SET XX: a turn that expired and was taken by another
# server meanwhile is that server's.
_TURN_ENDS_IN = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)

# (after, page size) -> (the page's last relationship id, or "" at the end; what it found)
ReconcilePage = Callable[[str, int], Awaitable[tuple[str, ReconcileReport]]]
# (after, through: the range of the page just reconciled) -> how many holds it released
ReleaseAbandoned = Callable[[str, str], Awaitable[int]]


def page_interval_seconds(quotas_per_second: float) -> float:
    """How often a page of PAGE_SIZE quotas is reconciled at this pace."""
    return PAGE_SIZE / quotas_per_second


def checked_pace(quotas_per_second: float) -> float:
    """The pace, or ValueError naming the setting: 0 (off) or above 0 up to the maximum."""
    if not 0 <= quotas_per_second <= MAX_QUOTAS_PER_SECOND:  # NaN fails both
        raise ValueError(
            f"MEDWALLET_RECONCILE_QUOTAS_PER_SECOND must be 0 (off) or up to "
            f"{MAX_QUOTAS_PER_SECOND:g}, not {quotas_per_second!r}"
        )
    return quotas_per_second


async def reconcile_rolling(
    quotas_per_second: float,
    commands: PipelinedRedis,
    ready: Callable[[], bool],
    reconcile_page: ReconcilePage,
    reconcile_dissolved: ReconcilePage | None = None,
    release_abandoned: ReleaseAbandoned | None = None,
) -> None:
    """Every page interval (JITTER), while the hot state is trusted (`ready`): takes the turn,
    and reconciles the page after the shared cursor when this server got it. A failure is
    logged; the page is tried again at a later turn (the cursor did not move)."""
    interval_seconds = page_interval_seconds(checked_pace(quotas_per_second))
    turn_after_ms = max(1, int(interval_seconds * TURN_SHARE_OF_INTERVAL * 1000))
    while True:
        await asyncio.sleep(interval_seconds * random.uniform(*JITTER))
        if not ready():  # a rebuild is under way, or Redis does not answer: it sets Redis
            continue
        try:
            await take_turn_and_reconcile(
                commands, turn_after_ms, reconcile_page, reconcile_dissolved, release_abandoned
            )
        except Exception:
            log.exception("rolling reconcile: a page failed; a later turn tries it again")


_last_pass_logged = [float("-inf")]


async def take_turn_and_reconcile(
    commands: PipelinedRedis,
    turn_after_ms: int,
    reconcile_page: ReconcilePage,
    reconcile_dissolved: ReconcilePage | None = None,
    release_abandoned: ReleaseAbandoned | None = None,
) -> ReconcileReport | None:
    """One look: the page after the cursor, when the turn was free (None: it was not), then the
    dissolutions' page after theirs (`reconcile_dissolved`: (cursor, page size) -> (the cursor
    to store, what it found)), then the abandoned holds on the quota page's quotas
    (`release_abandoned`). The turn then ends `turn_after_ms` after the pages did. Returns
    the quota page's report."""
    token = os.urandom(8).hex()
    running_ms = int(TURN_WHILE_RUNNING_SECONDS * 1000)
    if await commands.execute("SET", keys.RECONCILE_TURN, token, "NX", "PX", running_ms) is None:
        return None  # another server's turn
    cursor = await commands.execute("GET", keys.RECONCILE_CURSOR)
    after = cursor.decode() if isinstance(cursor, bytes) else ""
    last, report = await reconcile_page(after, PAGE_SIZE)
    # Counted first: the page set these quotas whatever happens to the bookkeeping below.
    metrics.reconcile_pages.inc()
    metrics.reconcile_quotas.inc(report.quotas)
    _count_found(report)
    # "" at the end of the quotas: the next page starts the next pass.
    await commands.execute("SET", keys.RECONCILE_CURSOR, last)
    if reconcile_dissolved is not None:
        stored = await commands.execute("GET", keys.RECONCILE_DISSOLVED_CURSOR)
        since = stored.decode() if isinstance(stored, bytes) else ""
        moved_to, dissolved = await reconcile_dissolved(since, PAGE_SIZE)
        _count_found(dissolved)
        if moved_to != since:
            await commands.execute("SET", keys.RECONCILE_DISSOLVED_CURSOR, moved_to)
    if release_abandoned is not None and last:
        # The next pass over these quotas looks again; meanwhile the turn is handed on as usual.
        try:
            await release_abandoned(after, last)
        except Unavailable as error:
            log.warning(
                "rolling reconcile: abandoned holds after %r not released: %s", after, error
            )
        except Exception:
            log.exception("rolling reconcile: releasing abandoned holds after %r failed", after)
    await commands.execute("EVAL", _TURN_ENDS_IN, 1, keys.RECONCILE_TURN, token, turn_after_ms)
    if report.drifted:
        log.warning(
            "rolling reconcile: %d of %d quotas after %r drifted by %d fen (%d overstated by "
            "Redis); set from the ledger",
            report.drifted, report.quotas, after, report.drift_fen, report.overstated,
        )  # fmt: skip
    now = time.monotonic()
    if not last and after and now - _last_pass_logged[0] >= PASS_LOG_SECONDS:
        _last_pass_logged[0] = now
        log.info("rolling reconcile: a pass over every quota ended; the next one begins")
    return report


def _count_found(report: ReconcileReport) -> None:
    """What a page found: the quotas it failed on, and the drift it set right."""
    metrics.reconcile_failures.inc(report.failed)
    metrics.reconcile_drift.inc(report.drifted)
    metrics.reconcile_drift_fen.inc(report.drift_fen)
