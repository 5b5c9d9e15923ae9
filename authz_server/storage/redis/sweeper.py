"""The hold sweeper's round, run every second by one process (Application._sweep).

Each round costs what is due, not the size of the keyspace:
- expired holds: the slots the due index names (SweepStore.sweep_due);
- captures stalled between their phases: the slots the capture index names
  (SweepStore.stalled_captures_due, SLOTS_PER_BATCH slots a call), settled by the caller as SQL
  says, then the next slots due (stalled_captures, up to SETTLE_CALLS_PER_ROUND calls a round):
  after a Redis loss every slot with an open hold is due at once (the rebuild lists the holds it
  put back), and at one call a round, each slot visited twice (its entry goes back until the
  next visit finds it settled), a province's holds took hours to settle while their expiries
  waited (measured: 20,000 holds in ~7 min, ~47 a second);
- the safety net: a SCAN of the keyspace spread over the rounds (SweepStore.index_step), which
  puts back index entries lost in a crash and counts the open holds. Each round scans at least
  SAFETY_NET_MINIMUM_KEYS keys, and enough for a whole pass in SAFETY_NET_PASS_SECONDS: a small
  keyspace is covered every round, a large one once a minute, evenly rather than in one burst.
  The open holds gauge is that count, so it is as old as the last complete pass (at most a
  minute); counting at every round would take the full SCAN this replaces.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from authz_server.storage.redis.sweep_store import STALE_CAPTURE_SECONDS, SweepStore

# Calls for the slots with stalled captures a round makes at most (SLOTS_PER_BATCH slots each):
# up to ~2,000 slots a round, the round's expiries waiting meanwhile.
SETTLE_CALLS_PER_ROUND = 40
# A whole pass of the safety net takes at most this long, whatever the keyspace's size.
SAFETY_NET_PASS_SECONDS = 60.0
# Keys a round scans at least (a few milliseconds of Redis time, in several calls).
SAFETY_NET_MINIMUM_KEYS = 10_000
# Keys per SCAN call: Redis does nothing else while one runs, so every call waiting behind it
# waits that long. SCAN with MATCH and TYPE over the service's keys: ~0.5 ms per 1,000 keys
# (a private redis-server 7.0 with 150,000 keys on the 2-core development VM; 10,000 a call
# took ~4.8 ms there and ~10 ms in a benchmark run under load: a p99 step every second).
SAFETY_NET_KEYS_PER_CALL = 1_000


@dataclass(frozen=True)
class SweepReport:
    expired: int
    stalled_captures: list[str]
    # Open holds at the end of a complete safety net pass; None when no pass ended this round.
    open_holds: int | None


class HoldSweeper:
    def __init__(self, sweeps: SweepStore, interval_seconds: float) -> None:
        self.sweeps = sweeps
        self.interval_seconds = interval_seconds
        self._cursor = 0
        self._keys_per_round = SAFETY_NET_MINIMUM_KEYS
        self._open_holds_in_pass = 0

    async def sweep(self, now_ms: int) -> SweepReport:
        expired = await self.sweeps.sweep_due(now_ms)
        stalled = await self.sweeps.stalled_captures_due(now_ms, STALE_CAPTURE_SECONDS * 1000)
        # The safety net last, so its count of open holds is after this round's expiries; what
        # it puts back in the indexes is taken at the next round.
        open_holds = await self._safety_net_round()
        return SweepReport(expired, stalled, open_holds)

    async def stalled_captures(self, now_ms: int) -> list[str]:
        """The next slots' stalled captures (and holds a rebuild put back) due now."""
        return await self.sweeps.stalled_captures_due(now_ms, STALE_CAPTURE_SECONDS * 1000)

    async def settle_due(
        self,
        now_ms: int,
        stalled: list[str],
        settle: Callable[[list[str], int], Awaitable[object]],
    ) -> None:
        """settle(stalled, now_ms), then the next slots' while any were due, up to
        SETTLE_CALLS_PER_ROUND calls. A call that found nothing may follow one whose slots went
        back to the index (their entries stay until a visit finds them settled): it takes those
        out, and the next call the slots after them. A settle that fails goes on to the next
        slots (what it left is listed still, for a later round; one bad hold, first in the index
        at every round, must not hold the rest back), and its error is raised at the end."""
        previous: list[str] = []
        failure: Exception | None = None
        for _ in range(SETTLE_CALLS_PER_ROUND):
            if not stalled and not previous:
                break
            try:
                await settle(stalled, now_ms)
            except Exception as error:
                failure = failure or error
            previous, stalled = stalled, await self.stalled_captures(now_ms)
        # `stalled` at the bound is unsettled: its slots went back to the index, for the next
        # round
        if failure is not None:
            raise failure

    async def _safety_net_round(self) -> int | None:
        if self._cursor == 0:  # a pass begins: size it to the keyspace as it is now
            keys_now = await self.sweeps.keys_in_database()
            rounds_per_pass = SAFETY_NET_PASS_SECONDS / self.interval_seconds
            self._keys_per_round = max(
                SAFETY_NET_MINIMUM_KEYS, math.ceil(keys_now / rounds_per_pass)
            )
            self._open_holds_in_pass = 0
        scanned = 0
        while scanned < self._keys_per_round:
            count = min(SAFETY_NET_KEYS_PER_CALL, self._keys_per_round - scanned)
            step = await self.sweeps.index_step(self._cursor, count)
            scanned += count
            self._cursor = step.cursor
            self._open_holds_in_pass += step.open_holds
            if step.cursor == 0:
                return self._open_holds_in_pass
        return None
