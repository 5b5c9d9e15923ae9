"""(An audit's test, of 7ff184d.) captures, a void, a partial capture and an untouched hold of one
put-back batch, run between the batch's SQL read (run_locking) and its Redis steps
(asyncio.gather): each must end as SQL says, and Redis (available, held) exactly SQL's."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from authz_server.service import capture_recovery
from authz_server.service.ports import HoldStatus
from tests.harness import Harness, lose_redis
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    register_merchants,
    void,
)
from tests.test_capture_unfinished_across_rebuild import awaiting_settlement, now_ms_of, status


def test_captures_and_voids_between_the_batch_read_and_its_redis_steps(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, monkeypatch: Any
) -> None:
    register_merchants(registry)
    families = [family(registry, relationships, 20_000) for _ in range(4)]
    held = [
        authorize(authorizations, HOSPITAL, f.beneficiary_id, MEDICAL, 12_000) for f in families
    ]
    assert all(answer.decision == APPROVED for answer in held)
    ids = [answer.authorization_id for answer in held]
    lose_redis(harness)
    assert all(awaiting_settlement(harness, i) for i in ids)
    app = harness.app
    real = app.database.run_locking
    reached, go = threading.Event(), asyncio.Event()

    async def paused(work: Any) -> Any:
        result = await real(work)
        reached.set()
        await go.wait()
        return result

    monkeypatch.setattr(app.database, "run_locking", paused)
    settled = asyncio.run_coroutine_threadsafe(
        capture_recovery.settle_stalled(app.database, app.holds, ids, now_ms_of(harness)),
        harness.loop,
    )
    assert reached.wait(10)
    assert capture(authorizations, HOSPITAL, ids[0]).status == CAPTURED
    assert capture(authorizations, HOSPITAL, ids[1], 5_000).status == CAPTURED
    void(authorizations, HOSPITAL, ids[2])
    harness.loop.call_soon_threadsafe(go.set)
    settled.result(10)
    expected = [
        (HoldStatus.CAPTURED, (8_000, 0)),
        (HoldStatus.CAPTURED, (15_000, 0)),
        (HoldStatus.VOIDED, (20_000, 0)),
        (HoldStatus.PENDING, (8_000, 12_000)),
    ]
    for number, (fam, authorization_id) in enumerate(zip(families, ids, strict=True)):
        (relationship_id,) = fam.relationship_ids
        seen = (
            status(harness, authorization_id),
            hot_figures(harness, fam.beneficiary_id, relationship_id),
        )
        assert seen == expected[number], (number, seen)
        assert not awaiting_settlement(harness, authorization_id)
        unused = ledger(harness, relationship_id).unused_fen
        assert sum(seen[1]) == unused
