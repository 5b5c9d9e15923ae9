"""A capture claimed 2 s before its hold's expiry; Redis is lost and the rebuild reads SQL just
after the expiry, so the hold is not put back at all (open_holds: expires_at > now). The
claim's write is still within CAPTURE_WRITE_DEADLINE_SECONDS of its claim and commits. A void,
or a capture under another key, in between is told UNAVAILABLE (retry): SQL says the hold
expired uncaptured, but within STALE_CAPTURE_SECONDS of its expiry a claim made before it may
still commit (service/lost_authorizations.py, CAPTURE_MAY_COMMIT). Before, it was told
AUTHORIZATION_EXPIRED, and then the family's quota was charged: the till was told nothing was
taken for money that was (an audit's finding; put-back holds had the same rule in Redis,
tests/test_capture_unfinished_across_rebuild.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from tests.harness import Harness, lose_redis
from tests.test_authorization_rules import (
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    PENDING,
    authorize,
    capture,
    family,
    get,
    register_merchants,
    void,
)
from tests.test_capture_across_restore import PausedCapture, let_go_after
from tests.test_capture_unfinished_across_rebuild import now_ms_of
from tests.test_redis_loss_audit import unused_in_sql


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


@pytest.fixture()
def paused(harness: Harness, authorizations: Any) -> Iterator[Callable[[str], PausedCapture]]:
    yield from let_go_after(PausedCapture, harness, authorizations)


@pytest.mark.parametrize("call", ["void", "capture"])
def test_a_lost_claim_of_a_hold_expired_before_the_rebuild_read_may_still_commit(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
    call: str,
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    hold = harness.run(harness.app.holds.get(held.authorization_id))
    assert hold is not None
    harness.clock.advance((hold.expires_ms - now_ms_of(harness)) / 1000 - 2)
    step = paused(held.authorization_id)
    step.start(0)  # claimed 2 s before the expiry; its SQL write waits
    harness.clock.advance(3)  # 1 s past the expiry, 3 s after the claim
    lose_redis(harness)  # the rebuild reads SQL past the expiry: the hold is not put back

    def void_or_capture() -> Any:
        if call == "void":
            return void(authorizations, HOSPITAL, held.authorization_id)
        return capture(authorizations, HOSPITAL, held.authorization_id, 12_000)

    told: Any
    try:
        told = void_or_capture()
    except grpc.RpcError as error:
        told = error
    # GetAuthorization agrees: not EXPIRED (final) while the capture may commit, but pending, as
    # a put-back hold shows in Redis (before: EXPIRED, then CAPTURED).
    assert get(authorizations, HOSPITAL, held.authorization_id).status == PENDING
    first = step.end()  # its write, 3 s after its claim (deadline 10 s), commits
    assert (first.status, first.captured_amount_fen) == (CAPTURED, 12_000)
    assert unused_in_sql(harness, relationship_id) == 8_000  # the family paid 12,000
    assert isinstance(told, grpc.RpcError)
    assert told.code() == grpc.StatusCode.UNAVAILABLE, (
        f"told {told.code()} {told.details()} while a capture claimed in the lost Redis could "
        "still commit, and it did"
    )
