"""Redis stalled for 2 s under the fault tests' load (tests/test_redis_loss.py, whose fixtures
and checks this uses; a file of its own so that the test runners spread the fault runs): calls
in flight time out and are answered UNAVAILABLE, nothing is lost, and nothing is rebuilt."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from tests.harness import Harness
from tests.test_redis_loss import (  # noqa: F401 - the module's fixtures, a server of its own
    check,
    families,
    lossy,
    run_with_fault,
    stubs,
)


def test_redis_stalled(
    lossy: Harness,  # noqa: F811
    stubs: Any,  # noqa: F811
    families: Any,  # noqa: F811
) -> None:
    rebuilt_before = lossy.app.guardian.last_rebuild

    def stall() -> None:
        # The Redis process stopped for 2 s, as DEBUG SLEEP 2 would stall it (the private Redis
        # refuses DEBUG): every call in flight times out meanwhile.
        process = lossy.redis.process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)
        threading.Timer(2.0, os.kill, (process.pid, signal.SIGCONT)).start()

    tally, before, recovery = run_with_fault(lossy, stubs, families, stall)
    check(lossy, stubs, "stalled 2 s", tally, before, recovery)
    assert tally.unavailable > 0  # the stall was felt
    # A stall loses nothing: no rebuild.
    assert lossy.app.guardian.last_rebuild is rebuilt_before
