"""(An audit's test; the defect was older than 7ff184d, which widened its window. Fixed:
settle_capture leaves a claim younger than STALE_CAPTURE_SECONDS to its own finish unless SQL
has its capture.) The sweeper's round settles a list of ids fetched as stalled,
but each id is settled as it is *when its turn comes* (capture_recovery.settle_capture reads
the hold again and finishes whatever claim it has then, whatever its age). A till's same-key
retry that found its capture STALLED settles it and claims the hold again (a live claim, 0 s
old) between the fetch and that id's turn: the sweeper reads SQL before the live claim's write
and finishes the LIVE claim PENDING. The write then commits; its finish finds the hold PENDING
(NOT_IN_CLAIM), and the hold stays PENDING in Redis while SQL counts it captured: Get says
PENDING to a till told CAPTURED, and the quota, set from the ledger with the hold still counted
held, declines an Authorize SQL can pay (until the hold expires, 24 h later). settle_due widens
the window: a list's CAPTURING ids are settled after the put-back holds of their batch (one SQL
read under every quota's lock, then their Redis steps) and after every earlier batch of the
list."""

from __future__ import annotations

from typing import Any

from authz_server.service import capture_recovery
from authz_server.service.ports import STALE_CAPTURE_SECONDS
from authz_server.storage.redis.sweep_store import SweepStore
from authz_server.storage.redis.sweeper import HoldSweeper
from tests.harness import Harness, new_id
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    get,
    register_merchants,
)


def test_a_list_fetched_as_stalled_does_not_settle_the_live_claim_of_a_retry(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, monkeypatch: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    authorization_id = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000
    ).authorization_id
    app = harness.app

    async def nothing(*_: Any) -> list[str]:
        return []

    # The running sweeper's capture index is this test's round (its expiries go on).
    monkeypatch.setattr(app.storage.sweeps, "stalled_captures_due", nothing)
    sweeper = HoldSweeper(SweepStore(app.storage.sweeps.commands), 1.0)

    key = new_id("capture")
    now_ms = int(harness.clock().timestamp() * 1000)
    stale_ms = now_ms - (STALE_CAPTURE_SECONDS + 1) * 1000
    claimed = harness.run(
        app.holds.capture_begin(authorization_id, "rules-hospital", key, 0, stale_ms)
    )
    assert claimed.outcome == "OK"  # a claim whose process died: stalled
    fetched = harness.run(sweeper.stalled_captures(now_ms))
    assert fetched == [authorization_id]

    writer = app.authorizations.captures.writer
    real_submit = writer.submit
    rounds: list[None] = []

    async def submit(unit: Any) -> Any:
        # The till's retry found its claim STALLED, settled it and claimed the hold again; its
        # write is about to go to SQL when the sweeper's round reaches the id it fetched.
        if not rounds:
            rounds.append(None)
            await sweeper.settle_due(
                now_ms,
                fetched,
                lambda stalled, due_ms: capture_recovery.settle_stalled(
                    app.database, app.holds, stalled, due_ms
                ),
            )
        return await real_submit(unit)

    writer.submit = submit  # type: ignore[method-assign]
    try:
        answer = capture(authorizations, HOSPITAL, authorization_id, key=key)
    finally:
        writer.submit = real_submit  # type: ignore[method-assign]
    assert rounds
    assert (answer.status, answer.captured_amount_fen) == (CAPTURED, 12_000)
    assert ledger(harness, relationship_id).spent_fen == 12_000
    assert ledger(harness, relationship_id).unused_fen == 8_000

    shown = get(authorizations, HOSPITAL, authorization_id)
    figures = hot_figures(harness, fam.beneficiary_id, relationship_id)
    # SQL: captured, 8,000 unused, nothing held; an Authorize of those 8,000 is payable.
    second = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
    seen = (shown.status, figures, second.decision)
    assert seen == (CAPTURED, (8_000, 0), APPROVED), seen
