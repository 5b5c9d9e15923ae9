"""A capture whose claim was lost with Redis finishes the hold a rebuild put back (PENDING,
rs = 1) once its SQL write commits. A quota restore (restore_from_ledger, reconcile) that runs
between that commit and the finish reads SQL's unused figure, which already counts the capture
as spent, and recounts held from the Redis holds, where the put-back hold still holds its part.
The finish then took the captured part out of held a second time without giving it to
available: Redis understated the quota by the captured part (declines of money the family has)
until the next reconcile. Now the finish asks for the capture's ledger entries and, where the
quota's mark r shows the restore counted the capture, takes the part out of held only, held
recounted from the other holds (lua/capture_finish.lua). Not simply held -= part, available +=
part: where a restore capped held at unused (a hold larger than what the capture left; it no
longer caps) that overstated available (Redis approving money SQL does not have). A restore
before the commit still sees the money unused: the part is released as taken, as before. Found
by an audit; every test here fails without the fix but the one with the restore before the
commit (and the limit's case that recounts).

The put-back hold does not know the key of the capture that finishes it (its claim was lost with
Redis), or knows that of a later claim whose write found the capture in SQL: a retry with the
capture's key was refused ALREADY_CAPTURED, and one with the later claim's key
IDEMPOTENCY_KEY_REUSED. Now a capture answered ALREADY_CAPTURED gets its key's stored answer
first, and a key captured in Redis whose answer SQL does not have is refused ALREADY_CAPTURED
(the last two tests; found by a later audit, each fails without that fix)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from authz_server.runtime.reconcile import reconcile
from authz_server.service.capture_recovery import settle_capture
from authz_server.service.capture_writer import CaptureUnit, CaptureWriter
from authz_server.service.ports import CaptureOutcome, Finish
from authz_server.service.quota_sync import restore_from_ledger
from authz_server.storage.redis import script_io
from tests.harness import Harness, lose_redis, new_id
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
    refused,
    register_merchants,
    void,
)
from tests.test_live_reconcile import redis_agrees_with_sql
from tests.test_redis_loss_audit import unused_in_sql

# How long a paused step of the capture waits for the test to let it go.
PAUSE_SECONDS = 20.0


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


class PausedCapture:
    """A capture of one authorization, claimed in Redis, paused at two of its real steps: its
    SQL write (CaptureWriter.submit) until `write` is set, and its hold's first finish as
    CAPTURED (HoldStore.capture_finish, after SQL committed) until `finish` is set. `key`: its
    idempotency key, as its till sent it (its retry sends it again)."""

    def __init__(self, harness: Harness, authorizations: Any, authorization_id: str) -> None:
        self.authorizations = authorizations
        self.authorization_id = authorization_id
        self.key = new_id("capture")
        self.writer: CaptureWriter = harness.app.authorizations.captures.writer
        self.holds = harness.app.holds
        self.real_submit = self.writer.submit
        self.real_finish = self.holds.capture_finish
        self.claimed, self.write = threading.Event(), threading.Event()
        self.finishing, self.finish = threading.Event(), threading.Event()
        self.outcomes: list[Any] = []
        self.thread: threading.Thread | None = None

    async def _wait(self, event: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PAUSE_SECONDS
        while not event.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def submit(self, unit: CaptureUnit) -> Any:
        if unit.authorization_id == self.authorization_id:
            self.claimed.set()  # claimed in Redis; its SQL write waits
            await self._wait(self.write)
        return await self.real_submit(unit)

    async def capture_finish(self, authorization_id: str, *arguments: Any, **named: Any) -> Any:
        ours = authorization_id == self.authorization_id and Finish.CAPTURED in arguments
        if ours and not self.finishing.is_set():  # the capture's own; others pass (a Void's)
            self.finishing.set()  # SQL committed the capture; its Redis step waits
            await self._wait(self.finish)
        return await self.real_finish(authorization_id, *arguments, **named)

    def start(self, amount_fen: int) -> None:
        """The capture (0: all of it), from a till's thread; returns once it is claimed."""
        self.writer.submit = self.submit  # type: ignore[method-assign]
        self.holds.capture_finish = self.capture_finish  # type: ignore[method-assign]

        def capture_it() -> None:
            try:
                answer = capture(
                    self.authorizations, HOSPITAL, self.authorization_id, amount_fen, key=self.key
                )
                self.outcomes.append(answer)
            except grpc.RpcError as error:
                self.outcomes.append(error.code())

        self.thread = threading.Thread(target=capture_it)
        self.thread.start()
        assert self.claimed.wait(PAUSE_SECONDS)

    def commit_across_redis_loss(self, harness: Harness, amount_fen: int) -> None:
        """start(); Redis lost and rebuilt while claimed (the hold put back PENDING, rs = 1);
        the SQL write let go; returns once it committed and its finish is paused."""
        self.start(amount_fen)
        lose_redis(harness)
        self.write.set()
        assert self.finishing.wait(PAUSE_SECONDS)

    def release(self) -> None:
        """Lets every paused step go, and the hooks with them."""
        self.write.set()
        self.finish.set()
        if self.thread is not None:
            self.thread.join(PAUSE_SECONDS)
        self.writer.submit = self.real_submit  # type: ignore[method-assign]
        self.holds.capture_finish = self.real_finish  # type: ignore[method-assign]

    def end(self) -> Any:
        """release(); the capture's answer."""
        self.release()
        assert len(self.outcomes) == 1, self.outcomes
        return self.outcomes[0]


Paused = TypeVar("Paused", bound=PausedCapture)


def let_go_after(
    kind: type[Paused], harness: Harness, authorizations: Any
) -> Iterator[Callable[[str], Paused]]:
    """For a fixture: starts a capture of `kind` (a PausedCapture) of an authorization; every
    one is let go after the test."""
    started: list[Paused] = []

    def pause(authorization_id: str) -> Paused:
        started.append(kind(harness, authorizations, authorization_id))
        return started[-1]

    yield pause
    for capture_under_way in reversed(started):
        capture_under_way.release()


@pytest.fixture()
def paused(harness: Harness, authorizations: Any) -> Iterator[Callable[[str], PausedCapture]]:
    yield from let_go_after(PausedCapture, harness, authorizations)


def restore(harness: Harness, relationship_ids: list[str]) -> None:
    for relationship_id in relationship_ids:
        harness.run(restore_from_ledger(harness.app.database, harness.app.quotas, relationship_id))


def committed(harness: Harness, relationship_id: str, unused_fen: int) -> None:
    """The capture's SQL write has committed (its finish is paused after it)."""
    assert unused_in_sql(harness, relationship_id) == unused_fen


@pytest.mark.parametrize(
    ("hold_fen", "capture_fen"),
    [
        (5_000, 5_000),  # the restore's held fits in unused
        (12_000, 12_000),  # more held than unused: available below zero until the finish
        (12_000, 5_000),  # a partial capture: the rest of the hold returns
    ],
)
def test_a_restore_between_the_commit_and_the_finish_is_not_counted_twice(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
    hold_fen: int,
    capture_fen: int,
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, hold_fen)
    assert held.decision == APPROVED
    step = paused(held.authorization_id)
    step.start(capture_fen)
    lose_redis(harness)  # the claim is lost: the hold is put back PENDING (rs = 1)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (
        20_000 - hold_fen,
        hold_fen,
    )
    step.write.set()
    assert step.finishing.wait(PAUSE_SECONDS)
    committed(harness, relationship_id, 20_000 - capture_fen)

    restore(harness, [relationship_id])  # SQL counts the capture spent; Redis holds the hold
    answer = step.end()

    assert (answer.status, answer.captured_amount_fen) == (CAPTURED, capture_fen)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (20_000 - capture_fen, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
    again = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 20_000 - capture_fen)
    assert again.decision == APPROVED, "Redis declines money the family has"


def test_a_restore_before_the_commit_leaves_the_captured_part_taken(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
) -> None:
    """The restore read SQL before the capture committed: unused still counts the part, so the
    finish takes it out of the quota (as without any restore)."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    step = paused(held.authorization_id)
    step.start(12_000)
    lose_redis(harness)
    restore(harness, [relationship_id])  # before the commit: the 12,000 still unused, held
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
    answer = step.end()

    assert (answer.status, answer.captured_amount_fen) == (CAPTURED, 12_000)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)


def test_a_reconcile_between_the_commit_and_the_finish_of_a_hold_on_two_quotas(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
) -> None:
    """A hold split across two quotas (10,000 + 5,000), another hold open beside it on the
    second; the reconcile (the operator's Job) runs between the capture's commit and its
    finish: each quota's part is released as the reconcile counted it."""
    fam = family(registry, relationships, 10_000, 10_000)
    first, second = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    assert held.decision == APPROVED
    assert [(part.relationship_id, part.amount_fen) for part in held.funding] == [
        (first, 10_000),
        (second, 5_000),
    ]
    beside = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 3_000)
    assert beside.decision == APPROVED
    step = paused(held.authorization_id)
    step.start(0)  # all of it
    lose_redis(harness)
    assert hot_figures(harness, fam.beneficiary_id, second) == (2_000, 8_000)
    step.write.set()
    assert step.finishing.wait(PAUSE_SECONDS)
    committed(harness, first, 0)
    committed(harness, second, 5_000)

    app = harness.app
    report = harness.run(reconcile(app.database, app.quotas, app.holds, harness.clock))
    assert report.busy == 0
    answer = step.end()

    assert (answer.status, answer.captured_amount_fen) == (CAPTURED, 15_000)
    assert hot_figures(harness, fam.beneficiary_id, first) == (0, 0)
    assert hot_figures(harness, fam.beneficiary_id, second) == (2_000, 3_000)
    for relationship_id in fam.relationship_ids:
        redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
    assert ledger(harness, second).unused_fen == 5_000


def test_a_void_that_finds_the_capture_committed_after_a_restore_finishes_the_hold_right(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
) -> None:
    """The other caller that finishes a put-back hold as CAPTURED: a Void whose SQL step finds
    the capture committed (ALREADY_CAPTURED) finishes the hold as SQL says, here after a restore
    and before the capture's own finish."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    step = paused(held.authorization_id)
    step.commit_across_redis_loss(harness, 12_000)
    committed(harness, relationship_id, 8_000)
    restore(harness, [relationship_id])

    refused(
        lambda: void(authorizations, HOSPITAL, held.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
    answer = step.end()  # its own finish finds the hold finished
    assert answer.status == CAPTURED
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)


@pytest.mark.parametrize(("holds_per_recount", "recounted"), [(1, True), (0, False)])
def test_a_quota_with_more_holds_than_a_recount_takes_is_set_from_the_ledger(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    holds_per_recount: int,
    recounted: bool,
) -> None:
    """One other hold on the quota: recounted within HOLDS_PER_RECOUNT; past it the finish
    releases the part as taken (understated, never overstated), answers FINISHED_UNDERSTATED,
    and the capture sets the quota from the ledger at once."""
    monkeypatch.setattr(script_io, "HOLDS_PER_RECOUNT", holds_per_recount)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 5_000)
    authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 3_000)  # a second hold
    step = paused(held.authorization_id)
    step.commit_across_redis_loss(harness, 5_000)
    committed(harness, relationship_id, 15_000)
    restore(harness, [relationship_id])
    with caplog.at_level("WARNING", logger="authz_server.service.capture_recovery"):
        assert step.end().status == CAPTURED

    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (12_000, 3_000)
    left_understated = "too many holds to recount" in caplog.text
    assert left_understated is not recounted, caplog.text


def test_a_retry_that_claims_the_put_back_hold_after_a_restore_finishes_it_right(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
) -> None:
    """The put-back hold (rs = 1) is claimed again by the till's retry (CAPTURING) after the
    restore: the first capture's finish then finds it in the retry's claim (nothing done; its
    fallback restore is BUSY), and the retry, finding the capture in SQL, finishes it in its own
    claim. That finish must compare r too (found by the audit of the fix: it released the part
    as taken, Redis (0, -4000) against SQL's 8,000)."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    assert held.decision == APPROVED
    step = paused(held.authorization_id)
    step.commit_across_redis_loss(harness, 12_000)  # committed; its finish paused
    committed(harness, relationship_id, 8_000)
    # r at least the capture's entry; the captured hold still held whole, above unused (the
    # finish takes it out; held was once capped at unused here, (0, 8,000))
    restore(harness, [relationship_id])
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (-4_000, 12_000)

    retry_claimed, retry_write = threading.Event(), threading.Event()

    async def retry_submit(unit: CaptureUnit) -> Any:
        retry_claimed.set()
        await step._wait(retry_write)
        return await step.real_submit(unit)

    step.writer.submit = retry_submit  # type: ignore[method-assign]
    retried: list[Any] = []

    def retry() -> None:
        try:
            retried.append(capture(authorizations, HOSPITAL, held.authorization_id, 12_000))
        except grpc.RpcError as error:
            retried.append((error.code(), error.details()))

    thread = threading.Thread(target=retry)
    thread.start()
    assert retry_claimed.wait(PAUSE_SECONDS)
    step.finish.set()  # the first capture's finish: the hold is in the retry's claim
    assert step.thread is not None
    step.thread.join(PAUSE_SECONDS)
    retry_write.set()
    thread.join(PAUSE_SECONDS)
    step.release()

    # A retry with a new key: refused, the authorization was captured (by the first one)
    ((code, details),) = retried
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "is captured" in details, details
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)


def test_the_sweeper_settles_a_put_back_hold_claimed_again_after_a_restore_right(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
) -> None:
    """The same through settle_capture (the sweeper, reconcile, a STALLED retry): the first
    capture's process died after SQL committed, a restore ran, a retry claimed the put-back hold
    and its process died too; the sweeper finishes it as SQL says."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    merchant_id = get(authorizations, HOSPITAL, held.authorization_id).merchant_id
    step = paused(held.authorization_id)
    step.commit_across_redis_loss(harness, 12_000)  # committed; its finish never comes
    committed(harness, relationship_id, 8_000)
    restore(harness, [relationship_id])
    app = harness.app
    claim = harness.run(
        app.holds.capture_begin(held.authorization_id, merchant_id, "retry", 12_000, 1)
    )
    assert claim.outcome is CaptureOutcome.OK
    now_ms = int(harness.clock().timestamp() * 1000)  # the claim (begun at 1 ms) is stale
    harness.run(settle_capture(app.database, app.holds, held.authorization_id, now_ms))
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)


def test_a_same_key_retry_of_a_capture_committed_across_a_redis_loss_gets_its_answer(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
) -> None:
    """The till's capture is claimed, Redis is lost and rebuilt (the hold put back PENDING,
    rs = 1, without the capture's key), the capture commits in SQL and finishes the put-back
    hold as CAPTURED. The till, whose call timed out while the finish waited for the rebuild,
    retries with the same key and request: it gets its stored answer, as every retry does.
    Before the fix (found by an audit) it was refused FAILED_PRECONDITION ALREADY_CAPTURED
    (capture_begin.lua compared its key with the hold's): told another capture had taken the
    payment its own capture made. Another key is still refused."""
    fam = family(registry, relationships, 20_000)
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    step = paused(held.authorization_id)
    step.commit_across_redis_loss(harness, 12_000)
    first = step.end()
    assert (first.status, first.captured_amount_fen) == (CAPTURED, 12_000)

    assert capture(authorizations, HOSPITAL, held.authorization_id, 12_000, key=step.key) == first
    refused(
        lambda: capture(authorizations, HOSPITAL, held.authorization_id, 12_000),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )


def test_a_key_whose_claim_of_the_put_back_hold_found_it_captured_is_refused_again(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
) -> None:
    """The first capture commits across a Redis loss, its finish paused. A second till (another
    key) claims the put-back hold; its write finds the capture in SQL: refused ALREADY_CAPTURED,
    the hold finished CAPTURED in its claim (so under its key). Its retry with the same key and
    request was answered ALREADY_EXISTS IDEMPOTENCY_KEY_REUSED before the fix (capture_begin.lua:
    REPLAY, and SQL has no answer for the key), as if it had sent another request; now it is
    refused ALREADY_CAPTURED again. The first till's retry gets its stored answer."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    step = paused(held.authorization_id)
    step.commit_across_redis_loss(harness, 12_000)  # committed; its finish paused
    committed(harness, relationship_id, 8_000)
    second_key = new_id("capture")
    for _ in range(2):  # its first call, then its retry
        refused(
            lambda: capture(
                authorizations, HOSPITAL, held.authorization_id, 12_000, key=second_key
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ALREADY_CAPTURED",
        )
    first = step.end()
    assert (first.status, first.captured_amount_fen) == (CAPTURED, 12_000)
    assert capture(authorizations, HOSPITAL, held.authorization_id, 12_000, key=step.key) == first
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
