"""The retention purge drops a closed month's Authorize idempotency records whatever their hold's
state. A hold decided on 31 January whose journal row never committed (its server died between
the script and the journal: the till got no answer) is still PENDING on 1 February (a medical
hold lasts a day). Before the purge the till's retry with its key replays that decision and
journals it: one hold. After it, the retry is decided anew: a second hold for the same sale,
the first still holding the family's money (until the abandoned-hold release, or its expiry a
day later, with the rolling reconcile off), other payments declined meanwhile."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz_server.domain.errors import Unavailable
from authz_server.generated.medwallet.v1 import authorization_pb2
from authz_server.service.authorization import AuthorizationService
from authz_server.service.retention import purge_closed_months
from tests import engine_factories as ef
from tests.test_authorization_recovery import hot_figures
from tests.test_settlement_races import HOSPITAL, World


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    yield world
    world.close()


def test_a_retry_after_the_purge_of_a_hold_never_journaled_does_not_hold_the_money_twice(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = world.harness.app
    beneficiary = world.authorizations.GetAuthorization(
        authorization_pb2.GetAuthorizationRequest(authorization_id=world.hold.authorization_id),
        metadata=HOSPITAL,
    ).authorization.beneficiary_id
    quota = world.hold.funding[0].relationship_id
    assert hot_figures(world.harness, beneficiary, quota) == (49_000, 1_000)

    # 31 January 23:50: the decision is made in Redis, then the server dies before journaling
    # it (modelled: the journal step fails, and nothing hands the row on).
    world.at(2025, 1, 31, 23, 50)
    request = ef.medical(beneficiary, 2_000)
    real_answer = AuthorizationService._answer

    async def dies(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise Unavailable("the server died before the journal")

    monkeypatch.setattr(AuthorizationService, "_answer", dies)
    with pytest.raises(grpc.RpcError):
        world.authorizations.Authorize(request, metadata=HOSPITAL)
    monkeypatch.setattr(AuthorizationService, "_answer", real_answer)
    assert hot_figures(world.harness, beneficiary, quota) == (47_000, 3_000)

    # January is closed and purged just after midnight, as the README says to.
    world.at(2025, 2, 1, 0, 5)
    world.settled("2025-01")
    world.harness.run(purge_closed_months(app.database, app.pipelined_redis))

    # The till retries the same request with the same key.
    world.at(2025, 2, 1, 0, 10)
    retried = world.authorizations.Authorize(request, metadata=HOSPITAL)
    assert retried.decision == authorization_pb2.DECISION_APPROVED
    # one sale, one hold of 2,000 fen (the World's own 1,000 besides)
    assert hot_figures(world.harness, beneficiary, quota) == (47_000, 3_000)
