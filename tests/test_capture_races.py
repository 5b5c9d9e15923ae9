"""A capture's hold is finished only by what finished its own claim. Two ways a finish for an
old claim, or for a claim still live, reopened a hold whose capture SQL then committed (the
merchant was told "captured"; a void or expiry then gave the money back to the quota, and Redis
showed more than SQL): a slow sweeper racing a till's same-key retry, and a reconcile run while
servers serve. And a claim still being written, which may yet fail, was taken for a capture: a
void, or a capture under another key, that found the hold CAPTURING was answered
ALREADY_CAPTURED (now UNAVAILABLE, retry). Found by audits; each test fails on the code before
its fix."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.runtime.reconcile import reconcile
from authz_server.service.capture_recovery import settle_capture
from authz_server.storage.redis.hold_store import STALE_CAPTURE_SECONDS
from authz_server.storage.sql.database import Database
from tests.harness import Harness, new_id
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import (
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    get,
    refused,
    register_merchants,
    void,
)
from tests.test_capture_across_restore import PausedCapture, let_go_after


def register(registry: Any) -> None:
    register_merchants(registry)


def settled_captured(
    harness: Harness, authorizations: Any, fam: Any, authorization_id: str
) -> None:
    """The hold is CAPTURED, cannot be voided, and Redis shows no more than SQL."""
    (relationship_id,) = fam.relationship_ids
    assert get(authorizations, HOSPITAL, authorization_id).status == CAPTURED
    refused(
        lambda: void(authorizations, HOSPITAL, authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )
    available, held = hot_figures(harness, fam.beneficiary_id, relationship_id)
    assert available + held <= ledger(harness, relationship_id).unused_fen
    assert ledger(harness, relationship_id).spent_fen == 12_000


class SlowSweeper:
    """The sweeper's hold store: its capture_finish waits for `go` (a sweeper that read SQL,
    then stalled), so a till's retry can settle and claim the hold again meanwhile."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    async def get(self, authorization_id: str) -> Any:
        return await self.real.get(authorization_id)

    async def capture_finish(self, *arguments: Any) -> None:
        self.reached.set()
        await self.go.wait()
        await self.real.capture_finish(*arguments)


def test_a_slow_sweeper_cannot_reopen_the_claim_of_a_retry(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register(registry)
    fam = family(registry, relationships, 20_000)
    authorization_id = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000
    ).authorization_id
    holds = harness.app.holds
    key = new_id("capture")
    # a capture claimed STALE_CAPTURE_SECONDS ago by a process that then died
    stale_ms = int(harness.clock().timestamp() * 1000) - (STALE_CAPTURE_SECONDS + 1) * 1000
    claimed = harness.run(holds.capture_begin(authorization_id, "rules-hospital", key, 0, stale_ms))
    assert claimed.outcome == "OK"

    async def sweeper_reads_sql() -> tuple[SlowSweeper, asyncio.Future[None]]:
        slow = SlowSweeper(holds)
        now_ms = int(harness.clock().timestamp() * 1000)
        settling = settle_capture(harness.app.database, slow, authorization_id, now_ms)
        task = asyncio.ensure_future(settling)
        await slow.reached.wait()  # SQL has nothing: about to put the hold back PENDING
        return slow, task

    slow, sweeper = harness.run(sweeper_reads_sql())
    writer = harness.app.authorizations.captures.writer
    real_submit = writer.submit

    async def submit(unit: Any) -> Any:
        # The till's retry found its capture STALLED, settled it, claimed it again; before
        # its write, the sweeper's late finish (for the old claim) lands.
        slow.go.set()
        await sweeper
        return await real_submit(unit)

    writer.submit = submit  # type: ignore[method-assign]
    try:
        answer = capture(authorizations, HOSPITAL, authorization_id, key=key)
    finally:
        writer.submit = real_submit  # type: ignore[method-assign]
    assert (answer.status, answer.captured_amount_fen) == (CAPTURED, 12_000)
    settled_captured(harness, authorizations, fam, authorization_id)


def test_a_reconcile_run_while_serving_leaves_a_live_capture_alone(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register(registry)
    fam = family(registry, relationships, 20_000)
    authorization_id = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000
    ).authorization_id
    writer = harness.app.authorizations.captures.writer
    real = writer._commit

    def slow(units: Any) -> Any:  # a busy SQL: the batch begins a moment later
        time.sleep(1.0)
        return real(units)

    answers: list[Any] = []
    till = threading.Thread(
        target=lambda: answers.append(capture(authorizations, HOSPITAL, authorization_id, 12_000))
    )
    writer._commit = slow  # type: ignore[method-assign]
    try:
        till.start()
        time.sleep(0.3)  # claimed in Redis, waiting for its batch
        # the operator's reconcile (the Job, or a new pod's start-up): its own SQL connection
        other = Database(harness.database_url)
        try:
            harness.run(reconcile(other, harness.app.quotas, harness.app.holds, harness.clock))
        finally:
            other.close()
        till.join(10)
    finally:
        writer._commit = real  # type: ignore[method-assign]
    assert [(a.status, a.captured_amount_fen) for a in answers] == [(CAPTURED, 12_000)]
    settled_captured(harness, authorizations, fam, authorization_id)


def test_a_void_while_the_capture_is_written_is_told_to_retry_not_already_captured(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """A void that finds the hold CAPTURING was answered ALREADY_CAPTURED, though the capture
    could still fail and put the hold back (found by an audit): now UNAVAILABLE, and its retry
    gets what the capture came to."""
    register(registry)
    fam = family(registry, relationships, 20_000)
    authorization_id = authorize(
        authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000
    ).authorization_id
    now_ms = int(harness.clock().timestamp() * 1000)
    claimed = harness.run(
        harness.app.holds.capture_begin(authorization_id, "rules-hospital", new_id("c"), 0, now_ms)
    )
    assert claimed.outcome == "OK"
    with pytest.raises(grpc.RpcError) as told:
        void(authorizations, HOSPITAL, authorization_id)
    assert told.value.code() == grpc.StatusCode.UNAVAILABLE
    # the capture fails for a passing reason: the hold is pending again, and the void goes on
    harness.run(harness.app.holds.capture_finish(authorization_id, str(now_ms), "PENDING", ""))
    assert void(authorizations, HOSPITAL, authorization_id).status == pb.AUTHORIZATION_STATUS_VOIDED
    available, held = hot_figures(harness, fam.beneficiary_id, fam.relationship_ids[0])
    assert (available, held) == (20_000, 0)


@pytest.fixture()
def paused(harness: Harness, authorizations: Any) -> Iterator[Callable[[str], PausedCapture]]:
    yield from let_go_after(PausedCapture, harness, authorizations)


@pytest.mark.parametrize("voided_first", [True, False], ids=["void-wins", "capture-wins"])
def test_a_capture_with_another_key_while_a_claim_is_written_is_told_to_retry(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
    voided_first: bool,
) -> None:
    """Capture A is claimed (CAPTURING), its SQL write not yet done. Capture B, another key (a
    cashier pasting the README's `--fresh-key` capture again), was answered FAILED_PRECONDITION
    ALREADY_CAPTURED (found by an audit); then a Void committed first in SQL, A was refused
    ALREADY_VOIDED and the hold ended VOIDED, nothing captured and all the money back in the
    quota: till B had been told the payment was taken (goods leave, the merchant is never
    paid). Now B is answered UNAVAILABLE, as a Void is, and its retry gets what A came to:
    ALREADY_VOIDED, or ALREADY_CAPTURED once A's capture is really there."""
    register(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    step = paused(held.authorization_id)
    step.start(0)  # claimed (CAPTURING); its SQL write waits
    second_key = new_id("capture")

    def capture_b() -> Any:
        return capture(authorizations, HOSPITAL, held.authorization_id, 12_000, key=second_key)

    with pytest.raises(grpc.RpcError) as told:
        capture_b()
    assert told.value.code() == grpc.StatusCode.UNAVAILABLE, told.value.details()
    if voided_first:
        with pytest.raises(grpc.RpcError) as told:  # SQL marked voided: A will be refused
            void(authorizations, HOSPITAL, held.authorization_id)
        assert told.value.code() == grpc.StatusCode.UNAVAILABLE, told.value.details()
    first = step.end()
    if voided_first:
        assert first == grpc.StatusCode.FAILED_PRECONDITION  # ALREADY_VOIDED
        final = get(authorizations, HOSPITAL, held.authorization_id)
        assert (final.status, final.captured_amount_fen) == (pb.AUTHORIZATION_STATUS_VOIDED, 0)
        assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (20_000, 0)
        refused(capture_b, grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_VOIDED")
    else:
        assert (first.status, first.captured_amount_fen) == (CAPTURED, 12_000)
        assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
        refused(capture_b, grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_CAPTURED")
