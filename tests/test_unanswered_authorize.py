"""An Authorize whose call ends after authorize.lua placed its hold but before the decision was
journaled: the client's deadline cancelled it (a cancelled caller's Redis command is still sent,
so the hold is placed all the same), Redis timed out on a reply after running the script, or
the journal refused the row (too far behind, SQL down). Before, the hold stayed in Redis only,
holding the family's money until it expired (a day for a medical hold) with SQL knowing nothing,
and no reconcile freed it (a restore keeps open holds). Now a follow-up does what the till's
retry with the same key would: replays the decision and journals it (service/authorization.py
_journal_unanswered)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from authz_server.domain.errors import Unavailable
from authz_server.service import authorization as authorization_module
from authz_server.storage.sql.tables import AuthorizationRow
from tests.harness import Harness
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


def followed_up(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("medwallet_authorize_unanswered_total", labels) or 0.0


def settled(harness: Harness) -> None:
    """Every follow-up the calls left has ended."""
    harness.run(harness.app.authorizations.to_the_end.finished())


class RefusingJournal:
    """The service's journal, refusing every row as one too far behind does while `refusing`
    (the thread journal and the ledger writer's client alike)."""

    def __init__(self, harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
        journal = harness.app.authorizations.journal
        self.real = journal.write
        self.refusing = True
        monkeypatch.setattr(journal, "write", self.write)

    async def write(self, row: dict[str, Any]) -> Any:
        if self.refusing:
            raise Unavailable("the decision journal is too far behind; retry")
        return await self.real(row)


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
        if not slowed:  # the call's own decision; the follow-up's replay is not slowed
            slowed.append(1)
            await asyncio.sleep(1.0)  # its reply is slow (a busy Redis, a SCAN ahead of it)
        return decided

    monkeypatch.setattr(holds, "authorize", slow_reply)
    journaled_before = followed_up("journaled")
    with pytest.raises(grpc.RpcError) as gave_up:
        authorizations.Authorize(
            authorize_request(fam.beneficiary_id, MEDICAL, 12_000), metadata=HOSPITAL, timeout=0.3
        )
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: journaled_fen(harness, fam.beneficiary_id) == (1, 12_000), seconds=10)
    settled(harness)
    assert followed_up("journaled") == journaled_before + 1
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
    assert ledger(harness, relationship_id).unused_fen == 20_000


def test_an_authorize_the_journal_refused_is_journaled_once_it_takes_rows_again(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    journal = RefusingJournal(harness, monkeypatch)
    with pytest.raises(grpc.RpcError) as refused:
        authorizations.Authorize(
            authorize_request(fam.beneficiary_id, MEDICAL, 12_000), metadata=HOSPITAL
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert journaled_fen(harness, fam.beneficiary_id) == (0, 0)
    journal.refusing = False
    wait_for(lambda: journaled_fen(harness, fam.beneficiary_id) == (1, 12_000), seconds=10)
    settled(harness)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)


def test_the_follow_up_gives_up_after_its_bound_and_says_so(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    RefusingJournal(harness, monkeypatch)
    monkeypatch.setattr(authorization_module, "UNANSWERED_FOLLOW_UP_SECONDS", 0.5)
    gave_up_before = followed_up("gave_up")
    with pytest.raises(grpc.RpcError):
        authorizations.Authorize(
            authorize_request(fam.beneficiary_id, MEDICAL, 12_000), metadata=HOSPITAL
        )
    settled(harness)  # ends within its bound, though the journal still refuses
    assert followed_up("gave_up") == gave_up_before + 1
    assert journaled_fen(harness, fam.beneficiary_id) == (0, 0)


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
            client.execute_command("CLIENT", "PAUSE", 1_200, "ALL")
            time.sleep(1.4)
    finally:
        stop.set()
        for thread in tills:
            thread.join(30)
        client.close()
    assert "approved" in answers
    assert "DEADLINE_EXCEEDED" in answers or "UNAVAILABLE" in answers
    wait_for(lambda: not harness.app.authorizations.to_the_end._left_running, seconds=90)
    settled(harness)
    for fam in families:
        (relationship_id,) = fam.relationship_ids
        available, held = hot_figures(harness, fam.beneficiary_id, relationship_id)
        _, approved = journaled_fen(harness, fam.beneficiary_id)
        assert held == approved, (fam.beneficiary_id, held, approved)
        assert available + held == ledger(harness, relationship_id).unused_fen == 50_000
