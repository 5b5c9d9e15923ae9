"""Work that runs to its end even when its caller is cancelled (its client's deadline passed).

A write whose SQL transaction is on the SQL thread goes on after the call that awaited it is
cancelled, and may commit. What the call does next (settle a capture's hold, give a release's
Redis debit back) must follow what SQL did, not how the call ended: so that part runs here, to
its end, and the stop waits for it (`finished`) before Redis and SQL close.

Work left running holds what its call held (`call_lease`: the call's in-flight slot, server/
limits.py) until it ends: a client giving up early does not free the service of the work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

from authz_server.domain.errors import DomainError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Lease:
    """What a call holds while it runs (its principal's in-flight slot, server/limits.py), given
    back once: when the call and any work of it left running (ToTheEnd) have all ended."""

    __slots__ = ("_give_back", "_holders")

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back: Callable[[], None] | None = give_back
        self._holders = 1  # the call

    def hold(self) -> None:
        if self._give_back is not None:
            self._holders += 1

    def end(self) -> None:
        give_back = self._give_back
        if give_back is None:
            return
        self._holders -= 1
        if self._holders == 0:
            self._give_back = None
            give_back()


# The lease of the call being served (set by the limiter; tasks the call starts inherit it).
call_lease: ContextVar[Lease | None] = ContextVar("call_lease", default=None)


class ToTheEnd:
    def __init__(self, what: str) -> None:
        self.what = what  # for the log line of a failure nobody was left to receive
        self._left_running: set[asyncio.Future[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """`work`'s result; if the caller is cancelled meanwhile, `work` goes on, is kept
        until it ends, and a failure of it is logged."""
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            lease = call_lease.get()
            if lease is not None and not task.done():
                # the work goes on: what its call held stays held until it ends
                lease.hold()
                task.add_done_callback(lambda _: lease.end())
            task.add_done_callback(self._outcome_seen)
            self._left_running.add(task)
            task.add_done_callback(self._left_running.discard)
            raise

    async def finished(self) -> None:
        """Returns once the work whose callers were cancelled has ended."""
        while self._left_running:
            await asyncio.wait(list(self._left_running))

    def _outcome_seen(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, DomainError):
            log.error("%s failed after its call was cancelled", self.what, exc_info=error)
