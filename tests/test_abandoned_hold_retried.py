"""A till that keeps retrying its key has not given up: a replay stamps the hold (rt) and the
grace runs from the last ask, so a hold whose replay could not be journaled either (SQL down)
is not released as abandoned seconds after its till asked again, and the till's next retry is
approved. (Found by an audit; failed before the fix.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from authz_server.domain.errors import Unavailable
from authz_server.runtime.release_abandoned_holds import release_abandoned_holds
from authz_server.server.authorization_handler import authorize_response
from authz_server.service import late_journal
from authz_server.storage.redis.unconfirmed_holds import UnconfirmedHolds
from tests.harness import Harness
from tests.held_proxy import HeldProxy
from tests.test_abandoned_holds import G, behind_a_proxy, delivered_late
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize_request,
    family,
    wait_for,
)
from tests.test_redis_loss import served_stubs


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, HeldProxy]]:
    yield from behind_a_proxy(tmp_path_factory.mktemp("abandoned-retrying-till"))


@pytest.fixture(scope="module")
def stubs(proxied: tuple[Harness, HeldProxy]) -> Iterator[Any]:
    yield from served_stubs(proxied[0])


def test_a_hold_whose_till_retried_30_s_ago_is_not_released_as_abandoned(
    proxied: tuple[Harness, HeldProxy], stubs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness, proxy = proxied
    registry, relationships, authorizations, _ = stubs
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    request = authorize_request(fam.beneficiary_id, MEDICAL, 6_000)
    (held,) = delivered_late(harness, proxy, authorizations, [request])  # placed at t0

    # SQL is down (the journal takes nothing) and the late journal's minute is short here.
    journal = harness.app.authorizations.journal
    real_write = journal.write

    async def down(row: dict[str, Any]) -> Any:
        raise Unavailable("SQL is down")

    monkeypatch.setattr(journal, "write", down)
    monkeypatch.setattr(late_journal, "RETRY_SECONDS", 0.3)

    # The till retries at t0 + G - 30 s: the replay of its hold cannot be journaled.
    harness.clock.advance(G - 30)
    with pytest.raises(grpc.RpcError) as caught:
        authorizations.Authorize(request, metadata=HOSPITAL, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_for(lambda: harness.app.authorizations.late_journal.waiting == 0, seconds=10)

    # SQL is back; 31 s after the till's last retry, the rolling page over its quota runs.
    monkeypatch.setattr(journal, "write", real_write)
    harness.clock.advance(31)
    app = harness.app
    released = harness.run(
        release_abandoned_holds(
            app.database, UnconfirmedHolds(app.pipelined_redis), relationship_id[:-1],
            relationship_id, G, authorize_response, harness.clock,
        )
    )  # fmt: skip
    answer = authorizations.Authorize(request, metadata=HOSPITAL, timeout=10)
    print("released:", released, "retry answered:", answer.decision, answer.decline_reason,
          "figures:", hot_figures(harness, fam.beneficiary_id, relationship_id))  # fmt: skip
    # What the contract says: a till that retried within the grace is not told HOLD_ABANDONED;
    # its retry journals the hold and is approved.
    assert (released, answer.decision, answer.decline_reason, answer.authorization_id) == (
        0, APPROVED, 0, held,
    )  # fmt: skip
