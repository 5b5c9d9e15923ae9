"""Work that runs to its end even when its caller is cancelled (its client's deadline passed).

A write whose SQL transaction is on the SQL thread goes on after the call that awaited it is
cancelled, and may commit. What the call does next (settle a capture's hold, give a release's
Redis debit back) must follow what SQL did, not how the call ended: so that part runs here, to
its end, and the stop waits for it (`finished`) before Redis and SQL close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from authz_server.domain.errors import DomainError

log = logging.getLogger(__name__)
T = TypeVar("T")


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
