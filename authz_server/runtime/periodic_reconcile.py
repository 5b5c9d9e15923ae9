"""Reconcile on a timer (MEDWALLET_RECONCILE_INTERVAL_SECONDS), taken in turn by one server.

A reconcile at start-up and the on-demand Job set Redis from SQL after a known fault; the
faults nobody notices (a race the scripts' fences do not cover, an operator's stray command, a
bug) leave a quota's figure off until the next one. So every interval one server of the
deployment, whichever takes keys.RECONCILE_TURN first, runs it while serving: each page of
quotas is read under its row locks and set before they are let go (runtime/reconcile.py), and
what it finds counts as drift (medwallet_reconcile_drift_total, whose alert then fires).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable

from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import PipelinedRedis

log = logging.getLogger(__name__)
# Each server waits the interval times a random factor in this range between looks: servers
# started together do not all ask for the turn at the same moment.
JITTER = (0.9, 1.1)
# The turn lasts this share of the interval: the next look after it, by any server, finds it
# free again; a server's own next look never comes earlier (JITTER's lower bound).
TURN_SHARE_OF_INTERVAL = 0.9


async def reconcile_periodically(
    interval_seconds: float,
    commands: PipelinedRedis,
    ready: Callable[[], bool],
    reconcile_once: Callable[[], Awaitable[None]],
) -> None:
    """Every interval (JITTER), while the hot state is trusted (`ready`): takes the turn, and
    runs `reconcile_once` when this server got it. A failure is logged and waits its turn."""
    turn_ms = max(1, int(interval_seconds * TURN_SHARE_OF_INTERVAL * 1000))
    while True:
        await asyncio.sleep(interval_seconds * random.uniform(*JITTER))
        if not ready():  # a rebuild is under way, or Redis does not answer: it sets Redis
            continue
        token = os.urandom(8).hex()
        try:
            taken = await commands.execute("SET", keys.RECONCILE_TURN, token, "NX", "PX", turn_ms)
            if taken is None:
                continue  # another server's turn
            await reconcile_once()
        except Exception:
            log.exception("periodic reconcile failed; the next turn tries again")
