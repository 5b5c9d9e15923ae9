"""An Authorize whose call is cancelled (the till's deadline) after authorize.lua placed its
hold but before the decision was journaled: a cancelled caller's Redis command is still sent,
so the hold is placed all the same. Before, the hold stayed in Redis only, holding the family's
money until it expired (a day for a medical hold) with SQL knowing nothing, and no reconcile
freed it (a restore keeps open holds); a key claimed by another request left its hold not undone
the same way. Now an Authorize runs to its end (service/to_the_end.py), as a call whose answer
was lost on the way does: its decision journaled, or undone; and a row the journal did not take
is submitted again later (service/late_journal.py, tests/test_late_journal.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from authz_server.storage.sql.tables import AuthorizationRow
from tests.harness import Harness, new_id
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize_request,
    family,
    register_merchants,
    wait_for,
)


def journaled_fen(harness: Harness, beneficiary_id: str) -> tuple[int, int]:
    """(decisions journaled for the beneficiary, the fen they approved)."""
    count, total = harness.app.database.transaction(
        lambda session: session.execute(
            select(func.count(), func.coalesce(func.sum(AuthorizationRow.approved_fen), 0)).where(
                AuthorizationRow.beneficiary_id == beneficiary_id
            )
        ).one()
    )
    return int(count), int(total)


def settled(harness: Harness) -> None:
    """Every Authorize whose call was cancelled, and every row handed to the late journal, has
    ended."""
    harness.run(harness.app.authorizations.to_the_end.finished())
    wait_for(lambda: harness.app.authorizations.late_journal.waiting == 0, seconds=90)


def test_an_authorize_cancelled_after_its_redis_decision_is_journaled_all_the_same(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    holds = harness.app.authorizations.holds
    real = holds.authorize
    slowed: list[int] = []

    async def slow_reply(*arguments: Any, **named: Any) -> Any:
        decided = await real(*arguments, **named)  # Redis has decided and placed the hold
        if not slowed:
            slowed.append(1)
            await asyncio.sleep(1.0)  # its reply is slow (a busy Redis, a SCAN ahead of it)
        return decided

    monkeypatch.setattr(holds, "authorize", slow_reply)
    with pytest.raises(grpc.RpcError) as gave_up:
        authorizations.Authorize(
            authorize_request(fam.beneficiary_id, MEDICAL, 12_000), metadata=HOSPITAL, timeout=0.3
        )
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: journaled_fen(harness, fam.beneficiary_id) == (1, 12_000), seconds=10)
    settled(harness)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
    assert ledger(harness, relationship_id).unused_fen == 20_000


def test_no_hold_is_left_in_redis_only_when_redis_stalls_under_short_deadlines(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """Tills with 0.3 s deadlines pay while Redis stops answering (CLIENT PAUSE, longer than the
    deadlines and the service's 0.5 s Redis timeout): the scripts queued behind the pause run
    when it ends, after their calls were cancelled or timed out. Afterwards every hold Redis
    has is journaled: each family's held figure equals what SQL approved for it."""
    register_merchants(registry)
    families = [family(registry, relationships, 50_000) for _ in range(6)]
    stop = threading.Event()
    answers: list[str] = []

    def till(number: int) -> None:
        fam = families[number]
        while not stop.is_set():
            try:
                answer = authorizations.Authorize(
                    authorize_request(fam.beneficiary_id, MEDICAL, 100),
                    metadata=HOSPITAL,
                    timeout=0.3,
                )
                answers.append("approved" if answer.decision == APPROVED else "declined")
            except grpc.RpcError as error:
                answers.append(error.code().name)

    tills = [threading.Thread(target=till, args=(number,)) for number in range(len(families))]
    for thread in tills:
        thread.start()
    client = harness.admin()
    try:
        for _ in range(3):
            time.sleep(0.5)
            client.execute_command("CLIENT", "PAUSE", 2_500, "ALL")
            time.sleep(2.7)
    finally:
        stop.set()
        for thread in tills:
            thread.join(30)
        client.close()
    assert "approved" in answers
    assert "DEADLINE_EXCEEDED" in answers or "UNAVAILABLE" in answers
    settled(harness)
    for fam in families:
        (relationship_id,) = fam.relationship_ids
        available, held = hot_figures(harness, fam.beneficiary_id, relationship_id)
        _, approved = journaled_fen(harness, fam.beneficiary_id)
        assert held == approved, (fam.beneficiary_id, held, approved)
        assert available + held == ledger(harness, relationship_id).unused_fen == 50_000


def test_a_cancelled_authorize_whose_key_another_request_claimed_leaves_nothing_held(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The merchant reused a key for another beneficiary: authorize.lua decided for the second
    one (its slot has no record of the key), and the merchant-wide claim found the first
    request's. The call's deadline passed while the replies were on their way: the undo of the
    second decision must still happen (found by an audit of an earlier version of this fix)."""
    register_merchants(registry)
    first = family(registry, relationships, 20_000)
    second = family(registry, relationships, 20_000)
    key = new_id("reused")
    authorizations.Authorize(
        authorize_request(first.beneficiary_id, MEDICAL, 5_000, idempotency_key=key),
        metadata=HOSPITAL,
    )
    holds = harness.app.authorizations.holds
    real = holds._decide_and_claim
    slowed: list[int] = []

    async def slow(*arguments: Any) -> Any:
        replies = await real(*arguments)  # decided and claimed: the claim is the first's
        if not slowed:
            slowed.append(1)
            await asyncio.sleep(1.0)
        return replies

    monkeypatch.setattr(holds, "_decide_and_claim", slow)
    with pytest.raises(grpc.RpcError) as gave_up:
        authorizations.Authorize(
            authorize_request(second.beneficiary_id, MEDICAL, 5_000, idempotency_key=key),
            metadata=HOSPITAL,
            timeout=0.3,
        )
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (relationship_id,) = second.relationship_ids
    wait_for(lambda: hot_figures(harness, second.beneficiary_id, relationship_id) == (20_000, 0))
    settled(harness)
    assert journaled_fen(harness, second.beneficiary_id) == (0, 0)
