"""The event loop's lag: how late it runs a timer, sampled every LOOP_LAG_PROBE_SECONDS into
medwallet_event_loop_lag_seconds. A busy loop runs ready callbacks in turn; a call's next step
(a Redis reply, its journal commit answered) waits behind all of them, and that wait is in every
latency but in no other metric. The probe costs one timer wake-up per interval."""

from __future__ import annotations

import asyncio

from authz_server.observability import metrics

LOOP_LAG_PROBE_SECONDS = 0.1


async def watch(interval_seconds: float = LOOP_LAG_PROBE_SECONDS) -> None:
    """Runs until cancelled."""
    loop = asyncio.get_running_loop()
    observe = metrics.event_loop_lag_seconds.observe
    while True:
        due = loop.time() + interval_seconds
        await asyncio.sleep(interval_seconds)
        observe(max(0.0, loop.time() - due))
