"""The release's reads (SRANDMEMBER, HMGET pipelines) and its undo route right on the session's
Redis: one node, and a Redis Cluster in CI's cluster pass (TEST_REDIS_CLUSTER=1), for holds
spread over many beneficiaries' slots."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from authz_server.runtime.release_abandoned_holds import release_abandoned_holds
from authz_server.server.authorization_handler import authorize_response
from authz_server.storage.redis.unconfirmed_holds import UnconfirmedHolds
from tests.harness import Harness
from tests.test_abandoned_hold_page_bound import unjournaled_hold
from tests.test_abandoned_holds import G
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import family, register_merchants


def test_release_routes_on_the_sessions_redis(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    register_merchants(registry)
    families = [family(registry, relationships, 10_000) for _ in range(12)]
    for fam in families:
        unjournaled_hold(harness, fam.beneficiary_id, fam.relationship_ids[0], 4_000)
    late = harness.clock() + timedelta(seconds=G + 1)  # the server's time: see unjournaled_hold
    app = harness.app
    released = 0
    for fam in families:
        (quota,) = fam.relationship_ids
        released += harness.run(
            release_abandoned_holds(
                app.database,
                UnconfirmedHolds(app.pipelined_redis),
                quota[:-1],
                quota,
                G,
                authorize_response,
                lambda: late,
            )
        )
    assert released == len(families)
    for fam in families:
        assert hot_figures(harness, fam.beneficiary_id, fam.relationship_ids[0]) == (10_000, 0)
