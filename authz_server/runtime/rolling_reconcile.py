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
province, bounds what it costs (one page of BATCH_SIZE quotas every BATCH_SIZE / pace seconds,
on one server at a time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable

from authz_server.observability import metrics
from authz_server.runtime.reconcile import BATCH_SIZE, ReconcileReport
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import PipelinedRedis

log = logging.getLogger(__name__)
# Each server waits the page interval times a random factor in this range between looks:
# servers started together do not all ask for the turn at the same moment.
JITTER = (0.9, 1.1)
# While a page runs, its turn lasts this long (a page of 500 quotas takes ~0.1 s, more on a
# loaded machine): no other server starts a page meanwhile. Once it ends, the turn is set to
# end one page interval later: the pace.
TURN_WHILE_RUNNING_SECONDS = 10.0
# Hands the turn on: sets KEYS[1] to expire in ARGV[2] ms if it still holds this server's token
# ARGV[1] (1 when it did). Not a plain SET XX: a turn that expired and was taken by another
# server meanwhile is that server's.
_TURN_ENDS_IN = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)

ReconcilePage = Callable[[str], Awaitable[tuple[str, ReconcileReport]]]


def page_interval_seconds(quotas_per_second: float) -> float:
    """How often a page of BATCH_SIZE quotas is reconciled at this pace."""
    return BATCH_SIZE / quotas_per_second


async def reconcile_rolling(
    quotas_per_second: float,
    commands: PipelinedRedis,
    ready: Callable[[], bool],
    reconcile_page: ReconcilePage,
) -> None:
    """Every page interval (JITTER), while the hot state is trusted (`ready`): takes the turn,
    and reconciles the page after the shared cursor when this server got it. A failure is
    logged; the page is tried again at a later turn (the cursor did not move)."""
    interval_seconds = page_interval_seconds(quotas_per_second)
    interval_ms = max(1, int(interval_seconds * 1000))
    while True:
        await asyncio.sleep(interval_seconds * random.uniform(*JITTER))
        if not ready():  # a rebuild is under way, or Redis does not answer: it sets Redis
            continue
        try:
            await take_turn_and_reconcile(commands, interval_ms, reconcile_page)
        except Exception:
            log.exception("rolling reconcile: a page failed; a later turn tries it again")


async def take_turn_and_reconcile(
    commands: PipelinedRedis, interval_ms: int, reconcile_page: ReconcilePage
) -> ReconcileReport | None:
    """One look: the page after the cursor, when the turn was free (None: it was not). The turn
    then ends `interval_ms` after the page did."""
    token = os.urandom(8).hex()
    running_ms = int(TURN_WHILE_RUNNING_SECONDS * 1000)
    if await commands.execute("SET", keys.RECONCILE_TURN, token, "NX", "PX", running_ms) is None:
        return None  # another server's turn
    cursor = await commands.execute("GET", keys.RECONCILE_CURSOR)
    after = cursor.decode() if isinstance(cursor, bytes) else ""
    last, report = await reconcile_page(after)
    # "" at the end of the quotas: the next page starts the next pass.
    await commands.execute("SET", keys.RECONCILE_CURSOR, last)
    await commands.execute("EVAL", _TURN_ENDS_IN, 1, keys.RECONCILE_TURN, token, interval_ms)
    metrics.reconcile_quotas.inc(report.quotas)
    metrics.reconcile_drift.inc(report.drifted)
    metrics.reconcile_drift_fen.inc(report.drift_fen)
    if report.drifted:
        log.warning(
            "rolling reconcile: %d of %d quotas after %r drifted by %d fen (%d overstated by "
            "Redis); set from the ledger",
            report.drifted, report.quotas, after, report.drift_fen, report.overstated,
        )  # fmt: skip
    if not last:
        log.info("rolling reconcile: a pass over every quota ended; the next one begins")
    return report
