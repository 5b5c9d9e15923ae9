"""One hold released twice over (a second server whose turn overlapped, or a hold funded by
quotas of two pages) is counted and logged once: authorize_undo.lua says whether it gave money
back, and only that release counts (medwallet_abandoned_holds_released_total). Money was right
either way. (Found by an audit; failed before the fix.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY

from authz_server.runtime.release_abandoned_holds import release_abandoned_holds
from authz_server.server.authorization_handler import authorize_response
from authz_server.storage.redis.unconfirmed_holds import UnconfirmedHolds
from tests.harness import Harness, own_harness
from tests.test_abandoned_hold_page_bound import unjournaled_hold
from tests.test_abandoned_holds import G
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import family
from tests.test_redis_loss import served_stubs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    yield from own_harness(tmp_path_factory.mktemp("abandoned-double-count"))


def released_metric() -> float:
    return REGISTRY.get_sample_value("medwallet_abandoned_holds_released_total") or 0.0


def test_one_hold_released_by_two_overlapping_pages_counts_once(server: Harness) -> None:
    stubs = served_stubs(server)
    registry, relationships, _, _ = next(stubs)
    try:
        fam = family(registry, relationships, 10_000)
    finally:
        stubs.close()
    (quota,) = fam.relationship_ids
    unjournaled_hold(server, fam.beneficiary_id, quota, 4_000)
    late = server.clock() + timedelta(seconds=G + 1)
    app = server.app
    before = released_metric()

    async def two_servers() -> list[int]:
        return list(
            await asyncio.gather(
                *(
                    release_abandoned_holds(
                        app.database,
                        UnconfirmedHolds(app.pipelined_redis),
                        "",
                        quota,
                        G,
                        authorize_response,
                        lambda: late,
                    )
                    for _ in range(2)
                )
            )
        )

    counts = server.run(two_servers())
    assert hot_figures(server, fam.beneficiary_id, quota) == (10_000, 0)  # money: once
    assert (sum(counts), released_metric() - before) == (1, 1.0)
