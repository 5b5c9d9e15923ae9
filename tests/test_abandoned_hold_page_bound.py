"""The page's bound on releases (RELEASED_PER_PAGE) counts only holds the release can act on:
holds it leaves alone (their key's record gone: the first call's digest is unknown), read in the
same order every pass, must not take the bound each pass and keep a releasable hold later in the
page holding its money until expiry. (Found by an audit; failed before the fix.)"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from authz_server.domain.types import Purpose
from authz_server.runtime.release_abandoned_holds import (
    RELEASED_PER_PAGE,
    release_abandoned_holds,
)
from authz_server.server.authorization_handler import authorize_response
from authz_server.service.ports import AuthorizeCall
from authz_server.storage.redis import keys
from authz_server.storage.redis.unconfirmed_holds import UnconfirmedHolds
from tests.harness import Harness, new_id, own_harness
from tests.test_abandoned_holds import G
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import family
from tests.test_redis_loss import served_stubs

MERCHANT = "rules-hospital"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    yield from own_harness(tmp_path_factory.mktemp("abandoned-page-cap"))


def unjournaled_hold(harness: Harness, beneficiary_id: str, relationship_id: str, fen: int) -> str:
    """A hold placed by authorize.lua whose journal row never came (as after a crash), at the
    server's time (a test may have moved its clock on: the session's server's is days ahead by
    the end of a pass, and a hold placed by the wall clock would be expired by its sweeper)."""
    holds = harness.app.authorizations.holds
    now_ms = int(harness.clock().timestamp() * 1000)
    call = AuthorizeCall(
        authorization_id=holds.new_authorization_id(beneficiary_id),
        merchant_id=MERCHANT,
        beneficiary_id=beneficiary_id,
        idempotency_key=new_id("k"),
        purpose=Purpose.MEDICAL_OUT_OF_POCKET.value,
        request_digest=new_id("digest"),
        eligible_fen=fen,
        allow_partial=False,
        relationship_id=relationship_id,
        expires_at_ms=now_ms + 86_400_000,
        decided_decline="",
        capture_at_once=False,
        requires_resident=False,
        template="",
        requested_fen=fen,
    )
    decision = harness.run(holds.authorize(call, now_ms))
    assert decision is not None and decision.approved_fen == fen
    return call.authorization_id


def test_holds_the_release_leaves_alone_do_not_starve_a_later_quota_of_the_page(
    server: Harness,
) -> None:
    stubs = served_stubs(server)
    registry, relationships, _, _ = next(stubs)
    try:
        families = [family(registry, relationships, 1_000_000) for _ in range(2)]
    finally:
        stubs.close()
    (first, second) = sorted(families, key=lambda fam: fam.relationship_ids[0])
    (first_quota,) = first.relationship_ids
    (second_quota,) = second.relationship_ids
    # 50 holds on the first quota whose key's record is gone (a month's records purged, an
    # eviction): the release leaves them to expire.
    client = server.admin()
    try:
        for _ in range(RELEASED_PER_PAGE):
            held = unjournaled_hold(server, first.beneficiary_id, first_quota, 100)
            key = client.hget(keys.authorization(held), "ik")
            assert isinstance(key, bytes)
            assert client.delete(keys.idempotency(first.beneficiary_id, MERCHANT, key.decode()))
    finally:
        client.close()
    # One ordinary abandoned hold on the second quota.
    unjournaled_hold(server, second.beneficiary_id, second_quota, 7_000)
    assert hot_figures(server, second.beneficiary_id, second_quota) == (993_000, 7_000)

    late = server.clock() + timedelta(seconds=G + 1)
    app = server.app
    released = [
        server.run(
            release_abandoned_holds(
                app.database,
                UnconfirmedHolds(app.pipelined_redis),
                "",
                max(first_quota, second_quota),
                G,
                authorize_response,
                lambda: late,
            )
        )
        for _ in range(5)  # five passes over the page
    ]
    figures = hot_figures(server, second.beneficiary_id, second_quota)
    assert (sum(released), figures) == (1, (1_000_000, 0))
