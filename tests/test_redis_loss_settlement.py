"""Redis flushed under the fault tests' load (tests/test_redis_loss.py, whose fixtures and checks
this uses; a file of its own so that the test runners spread the fault runs), then, while the
callers go on authorizing and capturing, the sweeper settles every hold the rebuild put back as
SQL says (the test clock moved past STALE_CAPTURE_SECONDS once the server serves again): the
settlement's batches (SQL reads under many quotas' locks at once, Redis steps at once) race the
captures of those same holds. Nothing is lost, nothing approved twice, Redis equals SQL after."""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import REGISTRY

from authz_server.service.ports import STALE_CAPTURE_SECONDS
from authz_server.storage.redis import keys
from tests.harness import Harness
from tests.test_authorization_rules import wait_for
from tests.test_redis_loss import (  # noqa: F401 - the module's fixtures, a server of its own
    check,
    families,
    lossy,
    run_with_fault,
    stubs,
)


def settled_not_captured() -> float:
    found = REGISTRY.get_sample_value(
        "medwallet_captures_settled_total", {"outcome": "not_captured"}
    )
    return found or 0.0


# How long the rebuild may take before the test gives up on it.
REBUILD_WAIT_SECONDS = 30.0


def test_redis_flushed_and_its_put_back_holds_settled_under_load(
    lossy: Harness,  # noqa: F811
    stubs: Any,  # noqa: F811
    families: Any,  # noqa: F811
) -> None:
    guardian = lossy.app.guardian
    rebuilt_before = guardian.last_rebuild
    listed: list[int] = []

    def settle_once_rebuilt() -> None:
        deadline = time.monotonic() + REBUILD_WAIT_SECONDS
        while guardian.last_rebuild is rebuilt_before or not guardian.ready:
            if time.monotonic() > deadline:
                return  # the check below fails: nothing was listed
            time.sleep(0.02)
        listed.append(lossy.run(lossy.client.zcard(keys.CAPTURES_BEGUN)))
        lossy.clock.advance(STALE_CAPTURE_SECONDS + 5)  # the settlement falls due under load

    def flush() -> None:
        lossy.run(lossy.client.flushall())
        threading.Thread(target=settle_once_rebuilt, daemon=True).start()

    reopened_before = settled_not_captured()
    tally, before, recovery = run_with_fault(lossy, stubs, families, flush)
    assert listed and listed[0] > 0, listed  # the rebuild listed the holds it put back

    # Every slot due visited and settled by the running sweeper (a round a second): what is
    # listed now is the callers' captures since, not due yet.
    def nothing_due() -> bool:
        due_ms = int(lossy.clock().timestamp() * 1000) - STALE_CAPTURE_SECONDS * 1000
        return lossy.run(lossy.client.zcount(keys.CAPTURES_BEGUN, "-inf", due_ms)) == 0

    wait_for(nothing_due, seconds=20)
    # The holds open at the flush, put back, settled open again (SQL had no capture of them).
    assert settled_not_captured() > reopened_before
    check(lossy, stubs, "FLUSHALL, put-back holds settled under load", tally, before, recovery)
