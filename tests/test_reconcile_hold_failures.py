"""The rolling reconcile's hold fixes (put back a hold Redis lost, void one SQL voided) never
stop a pass at their page: a hold Redis keeps failing on is counted in `failed` and the pass
goes on, as for a quota (tests/test_rolling_reconcile.py). Found by a second audit: the
put-back raised, the page was rolled back and tried again under its row locks, and the cursor
never moved past it while the fault lasted."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from authz_server.runtime import rolling_reconcile
from authz_server.runtime.reconcile import ReconcileReport, reconcile_page
from authz_server.storage.redis import keys
from tests.harness import Harness, own_harness
from tests.test_live_reconcile import redis_agrees_with_sql
from tests.test_reconcile_drift import family_with_a_hold, overstated
from tests.test_redis_loss import served_stubs


@pytest.fixture(scope="module")
def quiet_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    yield from own_harness(tmp_path_factory.mktemp("hold-failures"), reconcile_quotas_per_second=0)


def test_a_hold_whose_put_back_fails_does_not_stop_every_pass_at_its_page(
    quiet_server: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = quiet_server
    app = harness.app
    stubs = served_stubs(harness)
    registry, relationships, authorizations, _ = next(stubs)
    try:
        families = [family_with_a_hold(registry, relationships, authorizations) for _ in range(3)]
    finally:
        stubs.close()
    (bad_beneficiary, bad), _, (last_beneficiary, last) = sorted(families, key=lambda f: f[1])
    monkeypatch.setattr(rolling_reconcile, "PAGE_SIZE", 1)

    async def page(after: str, page_size: int) -> tuple[str, ReconcileReport]:
        # as server/app.py wires the rolling reconcile
        return await reconcile_page(
            app.database, app.quotas, after, page_size, rolling=True,
            holds=app.holds, clock=harness.clock,
        )  # fmt: skip

    client = harness.admin()
    try:
        # The bad quota as test_rolling_reconcile breaks it (its key another type), and its
        # hold missing from Redis (what the put-back is for): its put-back fails every time.
        (hold_id,) = [
            m.decode() for m in client.smembers(keys.prefix(bad_beneficiary) + ":qh:" + bad)
        ]
        client.delete(keys.authorization(hold_id))
        client.delete(keys.quota(bad_beneficiary, bad))
        client.set(keys.quota(bad_beneficiary, bad), "not a hash")
        overstated(harness, last_beneficiary, last)
        client.delete(keys.RECONCILE_TURN)
        client.set(keys.RECONCILE_CURSOR, bad[:-1])  # the next page begins with the bad quota
        failures = 0
        for _ in range(5):
            client.delete(keys.RECONCILE_TURN)
            try:
                harness.run(rolling_reconcile.take_turn_and_reconcile(app.pipelined_redis, 1, page))
            except Exception:  # the server's loop logs it and tries the same page next turn
                failures += 1
            if client.get(keys.RECONCILE_CURSOR) in (b"", last.encode()):
                break
        cursor = client.get(keys.RECONCILE_CURSOR)
        assert failures == 0 and cursor in (b"", last.encode()), (
            f"{failures} turns failed; the cursor is stuck at {cursor!r}, before the bad quota"
        )
        redis_agrees_with_sql(harness, last_beneficiary, last)
    finally:
        client.delete(keys.quota(bad_beneficiary, bad))
        client.close()
