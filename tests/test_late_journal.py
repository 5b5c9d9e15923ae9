"""A decision holding money that the journal did not take when its Authorize wrote it (SQL down,
the queue full): the call answers UNAVAILABLE at once, and the same row is submitted again in
the background (service/late_journal.py) until the journal takes it, so the hold is not left in
Redis only, holding the family's money until it expires with SQL knowing nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from authz_server.domain.errors import Unavailable
from authz_server.service import late_journal
from tests.harness import Harness, new_id
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    authorize_request,
    family,
    register_merchants,
    wait_for,
)
from tests.test_unanswered_authorize import journaled_fen


def late(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("medwallet_authorize_late_journal_total", labels) or 0.0


class RefusingJournal:
    """The service's journal refusing every row while `refusing` (SQL down, as the thread
    journal and the ledger writer's client both answer it), the first `first_only` rows only
    when that is set."""

    def __init__(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch, first_only: int = 0
    ) -> None:
        journal = harness.app.authorizations.journal
        self.real = journal.write
        self.refusing = True
        self.first_only = first_only
        self.refused = 0
        monkeypatch.setattr(journal, "write", self.write)

    async def write(self, row: dict[str, Any]) -> Any:
        if self.refusing and (not self.first_only or self.refused < self.first_only):
            self.refused += 1
            raise Unavailable("the decision journal did not answer: SQL is down")
        return await self.real(row)


@pytest.fixture(autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


def test_a_hold_the_journal_refused_is_journaled_once_sql_is_back(
    harness: Harness, relationships: Any, registry: Any, authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    journal = RefusingJournal(harness, monkeypatch)
    journaled_before = late("journaled")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        authorizations.Authorize(
            authorize_request(fam.beneficiary_id, MEDICAL, 12_000), metadata=HOSPITAL
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 1.0  # answered at once, not after retries
    time.sleep(1.5)  # SQL stays down past the first tries
    assert journaled_fen(harness, fam.beneficiary_id) == (0, 0)
    assert harness.app.authorizations.late_journal.waiting >= 1
    journal.refusing = False
    wait_for(lambda: journaled_fen(harness, fam.beneficiary_id) == (1, 12_000), seconds=15)
    wait_for(lambda: late("journaled") == journaled_before + 1)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)


def test_a_late_row_whose_key_sql_answered_before_undoes_its_hold(
    harness: Harness, relationships: Any, registry: Any, authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """SQL answered the key before (authorization X) and Redis lost the key's record: a retry
    decides anew (Y), the journal refuses Y's row, and the late journal then finds X under the
    key: Y's hold goes, as a live call's would."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    key = new_id("key")
    first = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 5_000, idempotency_key=key
    )
    assert first.decision == APPROVED
    client = harness.admin()
    try:  # Redis lost the key's records (its decision's and the merchant-wide claim), not the hold
        lost = list(client.scan_iter(match=f"*{key}*"))
        assert lost
        client.delete(*lost)
    finally:
        client.close()
    RefusingJournal(harness, monkeypatch, first_only=1)
    undone_before = late("undone")
    with pytest.raises(grpc.RpcError) as refused:
        authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 5_000, idempotency_key=key)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_for(lambda: late("undone") == undone_before + 1, seconds=15)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (15_000, 5_000)
    assert journaled_fen(harness, fam.beneficiary_id) == (1, 5_000)


def test_the_late_journal_gives_up_after_its_bound_naming_the_authorization(
    harness: Harness, relationships: Any, registry: Any, authorizations: Any,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    fam = family(registry, relationships, 20_000)
    RefusingJournal(harness, monkeypatch)
    monkeypatch.setattr(late_journal, "RETRY_SECONDS", 0.5)
    gave_up_before = late("gave_up")
    with pytest.raises(grpc.RpcError):
        authorizations.Authorize(
            authorize_request(fam.beneficiary_id, MEDICAL, 12_000), metadata=HOSPITAL
        )
    wait_for(lambda: late("gave_up") == gave_up_before + 1, seconds=10)
    assert harness.app.authorizations.late_journal.waiting == 0
    assert any("was not journaled (gave_up" in record.getMessage() for record in caplog.records)
    assert journaled_fen(harness, fam.beneficiary_id) == (0, 0)


def test_a_till_retrying_its_key_hands_the_row_once(
    harness: Harness, relationships: Any, registry: Any, authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Each retry replays the same decision and its row is refused again: one row waits, not
    one a retry (they would crowd out other holds' rows under MAX_ROWS)."""
    fam = family(registry, relationships, 20_000)
    journal = RefusingJournal(harness, monkeypatch)
    waiting = harness.app.authorizations.late_journal
    before = waiting.waiting
    request = authorize_request(fam.beneficiary_id, MEDICAL, 12_000)
    for _ in range(4):
        with pytest.raises(grpc.RpcError):
            authorizations.Authorize(request, metadata=HOSPITAL)
    assert journal.refused == 4
    assert waiting.waiting == before + 1
    journal.refusing = False
    wait_for(lambda: journaled_fen(harness, fam.beneficiary_id) == (1, 12_000), seconds=15)


class DownJournal:
    """A journal whose SQL is down until `up`."""

    def __init__(self) -> None:
        self.up = False
        self.rows: list[str] = []

    async def write(self, row: dict[str, Any]) -> None:
        if not self.up:
            raise Unavailable("the decision journal did not answer: SQL is down")
        self.rows.append(row["authorization_id"])


def test_a_stop_gives_each_waiting_row_a_last_try_and_counts_the_rest_abandoned(
    harness: Harness,
) -> None:
    journal = DownJournal()
    rows = late_journal.LateJournal(journal)

    async def scenario() -> tuple[int, int]:
        rows.hand({"authorization_id": "a-taken"}, None)
        rows.hand({"authorization_id": "a-left"}, None)
        await asyncio.sleep(0)
        waiting = rows.waiting
        journal.up = True  # SQL is back for the last try of the first only
        original = journal.write

        async def first_only(row: dict[str, Any]) -> None:
            if row["authorization_id"] != "a-taken":
                raise Unavailable("the decision journal did not answer")
            await original(row)

        journal.write = first_only  # type: ignore[method-assign]
        await rows.stop()
        rows.hand({"authorization_id": "a-after-stop"}, None)  # given up on at once
        return waiting, rows.waiting

    abandoned_before, journaled_before = late("abandoned"), late("journaled")
    waiting, left = harness.run(scenario())
    assert (waiting, left) == (2, 0)
    assert journal.rows == ["a-taken"]
    assert late("journaled") == journaled_before + 1
    assert late("abandoned") == abandoned_before + 2  # a-left, and a-after-stop
