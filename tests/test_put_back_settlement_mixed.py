"""The batched settlement (capture_recovery.settle_stalled; an audit's test): one call settles put-
back holds of several beneficiaries (slots) whose lost claims committed in SQL, others never
claimed, and an unknown id; a Redis step that fails for one hold leaves only that hold listed
(the next round settles it); the dead captures' late finishes move nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from authz_server.domain.errors import Unavailable
from authz_server.service import capture_recovery
from authz_server.service.ports import HoldStatus
from tests.harness import Harness, lose_redis
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    family,
    register_merchants,
)
from tests.test_capture_across_restore import PAUSE_SECONDS, let_go_after
from tests.test_capture_unfinished_across_rebuild import (
    DeadCapture,
    awaiting_settlement,
    now_ms_of,
    status,
)
from tests.test_live_reconcile import redis_agrees_with_sql
from tests.test_redis_loss_audit import unused_in_sql


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


@pytest.fixture()
def dead(harness: Harness, authorizations: Any) -> Iterator[Callable[[str], DeadCapture]]:
    yield from let_go_after(DeadCapture, harness, authorizations)


def test_a_batch_of_mixed_holds_is_settled_each_as_sql_says(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    dead: Callable[[str], DeadCapture],
    monkeypatch: Any,
) -> None:
    families = [family(registry, relationships, 20_000) for _ in range(6)]
    held = [
        authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000) for fam in families
    ]
    assert all(answer.decision == APPROVED for answer in held)
    ids = [answer.authorization_id for answer in held]
    # 0, 1, 2: claimed, Redis lost, their SQL writes commit after the rebuild; finishes never come
    steps = []
    for authorization_id in ids[:3]:
        step = dead(authorization_id)
        step.start(0)
        steps.append(step)
    lose_redis(harness)
    for step in steps:
        step.write.set()
        assert step.finishing.wait(PAUSE_SECONDS)
    for authorization_id in ids:
        assert status(harness, authorization_id) is HoldStatus.PENDING
        assert awaiting_settlement(harness, authorization_id)
    for fam in families[:3]:
        assert unused_in_sql(harness, fam.relationship_ids[0]) == 8_000
    # 1 and 3: their Redis step fails once (a lost reply)
    failing = {ids[1], ids[3]}
    real_finish, real_clear = harness.app.holds.capture_finish, harness.app.holds.clear_capture

    async def finish_failing(authorization_id: str, *arguments: Any, **named: Any) -> Any:
        if authorization_id in failing:
            raise Unavailable("Redis did not answer")
        return await real_finish(authorization_id, *arguments, **named)

    async def clear_failing(authorization_id: str, expires_ms: int) -> Any:
        if authorization_id in failing:
            raise Unavailable("Redis did not answer")
        return await real_clear(authorization_id, expires_ms)

    monkeypatch.setattr(harness.app.holds, "capture_finish", finish_failing)
    monkeypatch.setattr(harness.app.holds, "clear_capture", clear_failing)
    unknown = "auth-unknown-0000"
    with pytest.raises(Unavailable):
        harness.run(
            capture_recovery.settle_stalled(
                harness.app.database, harness.app.holds, [*ids, unknown], now_ms_of(harness)
            )
        )
    for number in (0, 2):
        assert status(harness, ids[number]) is HoldStatus.CAPTURED, number
        assert not awaiting_settlement(harness, ids[number])
    for number in (4, 5):
        assert status(harness, ids[number]) is HoldStatus.PENDING
        assert not awaiting_settlement(harness, ids[number])
    for number in (1, 3):  # failed: still listed, still PENDING
        assert status(harness, ids[number]) is HoldStatus.PENDING
        assert awaiting_settlement(harness, ids[number])
    failing.clear()
    assert (
        harness.run(
            capture_recovery.settle_stalled(
                harness.app.database, harness.app.holds, [ids[1], ids[3]], now_ms_of(harness)
            )
        )
        == 2
    )
    assert status(harness, ids[1]) is HoldStatus.CAPTURED
    assert status(harness, ids[3]) is HoldStatus.PENDING
    assert not any(awaiting_settlement(harness, authorization_id) for authorization_id in ids)
    for fam in families:
        redis_agrees_with_sql(harness, fam.beneficiary_id, fam.relationship_ids[0])
    for step in reversed(steps):  # the "dead" finishes after all: nothing moves
        step.release()
    time.sleep(0.2)
    for number, fam in enumerate(families):
        redis_agrees_with_sql(harness, fam.beneficiary_id, fam.relationship_ids[0])
        expected = (8_000, 0) if number < 3 else (8_000, 12_000)
        assert hot_figures(harness, fam.beneficiary_id, fam.relationship_ids[0]) == expected
