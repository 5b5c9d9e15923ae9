"""A capture whose SQL write fails for a reason that is not a refusal, or whose call is cancelled
while it is being written, is settled as SQL says, never by the failure: when the COMMIT went
through but its reply was lost (a dropped PostgreSQL connection), or committed after the
client's deadline passed, a hold put back or voided would give money SQL counts as spent back
to the quota in Redis (by a void, by expiry), and the family could spend it twice. The faults
are injected where the driver would raise them: after or instead of the batch's real
transaction; the cancel is a real client deadline."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from authz_server.domain.errors import Unavailable
from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.service.capture_recovery import settle_capture
from authz_server.service.capture_writer import CaptureUnit, CaptureWriter, Outcome
from authz_server.storage.redis import keys
from authz_server.storage.redis.sweep_store import STALE_CAPTURE_SECONDS, SweepStore
from authz_server.storage.sql.tables import AuthorizationRow
from tests.harness import Harness, new_id
from tests.test_authorization_recovery import ledger
from tests.test_authorization_rules import (
    CAPTURED,
    COLLECTOR,
    HOSPITAL,
    LTC_PREMIUM,
    MEDICAL,
    authorize,
    capture,
    family,
    figures,
    get,
    refused,
    register_merchants,
    void,
)

LOST = OperationalError("COMMIT", None, Exception("server closed the connection unexpectedly"))


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


@pytest.fixture()
def writer(harness: Harness) -> Iterator[CaptureWriter]:
    captures = harness.app.authorizations.captures.writer
    real = captures._commit
    yield captures
    captures._commit = real  # type: ignore[method-assign]


def failing_commit(real: Callable[[list[CaptureUnit]], list[Outcome]], *, commits: bool) -> Any:
    def commit(units: list[CaptureUnit]) -> list[Outcome]:
        if commits:
            real(units)  # the transaction commits ...
        raise LOST  # ... and its answer is lost (or it never got that far)

    return commit


def test_a_commit_whose_reply_was_lost_is_answered_captured_and_not_given_back(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    real = writer._commit
    writer._commit = failing_commit(real, commits=True)
    answer = authorize(authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000)
    assert answer.status == CAPTURED
    # Redis and SQL agree: 15,000 spent, 5,000 left, nothing held (voiding it would show 20,000
    # available beside 15,000 spent).
    assert figures(relationships, relationship_id) == (5_000, 0, 15_000)
    assert ledger(harness, relationship_id).spent_fen == 15_000
    # The money given back would have paid a second premium; there is not enough for one now.
    writer._commit = real
    again = authorize(authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000)
    assert again.approved_amount_fen == 0


def pays_once_when_retried(
    harness: Harness, relationships: Any, authorizations: Any, fam: Any, key: str
) -> None:
    """The till's retries with the key of a premium that failed: the payment is made, once."""
    (relationship_id,) = fam.relationship_ids
    for _ in range(2):
        again = authorize(
            authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000, idempotency_key=key
        )
        assert (again.decision, again.status) == (pb.DECISION_APPROVED, CAPTURED)
        assert figures(relationships, relationship_id) == (5_000, 0, 15_000)
        assert ledger(harness, relationship_id).spent_fen == 15_000


def test_a_write_that_never_happened_is_voided_answers_unavailable_and_a_retry_pays_once(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    real = writer._commit
    writer._commit = failing_commit(real, commits=False)
    key = new_id("premium")
    with pytest.raises(grpc.RpcError) as failed:
        authorize(
            authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000, idempotency_key=key
        )
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert figures(relationships, relationship_id) == (20_000, 0, 0)
    assert ledger(harness, relationship_id).spent_fen == 0
    # Nothing was paid: the retry (same key, as the client library sends it) makes the payment,
    # where it was answered DECLINED RELATIONSHIP_NOT_ACTIVE before.
    writer._commit = real
    pays_once_when_retried(harness, relationships, authorizations, fam, key)


class UnreachableDatabase:
    """The service's database, every transaction of which fails as if SQL were down."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def run(self, work: Any) -> Any:
        raise Unavailable("the database did not answer: (injected)")


@pytest.fixture()
def service(harness: Harness) -> Iterator[Any]:
    """The captures' part of the service (service/captures.py): its reads of SQL after a
    failed write are what an unreachable database refuses."""
    service = harness.app.authorizations.captures
    real = service.database
    yield service
    service.database = real


def left_capturing(
    authorizations: Any, service: Any, writer: Any, fam: Any, key: str, *, commits: bool
) -> None:
    """A premium whose write fails, and SQL cannot say afterwards whether it happened: its hold
    is left CAPTURING for the sweeper (what a process killed between Redis and SQL leaves too)."""
    real_commit, real_database = writer._commit, service.database
    writer._commit = failing_commit(real_commit, commits=commits)
    service.database = UnreachableDatabase(real_database)
    try:
        with pytest.raises(grpc.RpcError) as failed:
            authorize(
                authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000,
                idempotency_key=key,
            )  # fmt: skip
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        writer._commit, service.database = real_commit, real_database


def sweep_stalled_payment(harness: Harness, beneficiary_id: str) -> None:
    """What the running sweeper does once the payment is STALE_CAPTURE_SECONDS old: it finds the
    payment through the capture index and settles it as SQL says."""
    holds = harness.app.holds
    stale_ms = STALE_CAPTURE_SECONDS * 1000
    later_ms = int(harness.clock().timestamp() * 1000) + stale_ms + 1_000
    stalled = harness.run(
        SweepStore(harness.app.pipelined_redis).stalled_captures_due(later_ms, stale_ms)
    )
    ours = [i for i in stalled if keys.prefix_of_authorization(i) == keys.prefix(beneficiary_id)]
    assert len(ours) == 1, stalled
    harness.run(settle_capture(harness.app.database, holds, ours[0], later_ms))


def test_a_payment_left_capturing_and_never_written_is_voided_by_the_sweeper(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    writer: Any,
    service: Any,
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    key = new_id("premium")
    left_capturing(authorizations, service, writer, fam, key, commits=False)
    assert figures(relationships, relationship_id) == (5_000, 15_000, 0)
    # A one-step payment never went into the sweeper's capture index: held for good.
    sweep_stalled_payment(harness, fam.beneficiary_id)
    assert figures(relationships, relationship_id) == (20_000, 0, 0)
    pays_once_when_retried(harness, relationships, authorizations, fam, key)


def test_a_payment_left_capturing_whose_commit_went_through_is_captured_by_the_sweeper(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    writer: Any,
    service: Any,
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    key = new_id("premium")
    left_capturing(authorizations, service, writer, fam, key, commits=True)
    sweep_stalled_payment(harness, fam.beneficiary_id)
    assert figures(relationships, relationship_id) == (5_000, 0, 15_000)
    # the retry is answered with the payment SQL has: captured, and not paid again
    pays_once_when_retried(harness, relationships, authorizations, fam, key)
    # and the decision, which its failed first call never journaled, is journaled by the retry
    harness.run(harness.app.journal.flush())

    def journaled(session: Any) -> list[tuple[str, int]]:
        rows = session.execute(
            select(AuthorizationRow.decision, AuthorizationRow.approved_fen).where(
                AuthorizationRow.idempotency_key == key
            )
        )
        return [tuple(row) for row in rows]

    assert harness.app.database.transaction(journaled) == [("APPROVED", 15_000)]


def hospital_hold(registry: Any, relationships: Any, authorizations: Any) -> tuple[str, str]:
    """A 12,000 fen hold on a quota of 20,000: (relationship id, authorization id)."""
    fam = family(registry, relationships, 20_000)
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    return fam.relationship_ids[0], held.authorization_id


def cannot_be_voided(authorizations: Any, authorization_id: str) -> None:
    refused(
        lambda: void(authorizations, HOSPITAL, authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )


def test_a_capture_whose_reply_was_lost_answers_ok_and_cannot_be_voided(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    relationship_id, authorization_id = hospital_hold(registry, relationships, authorizations)
    writer._commit = failing_commit(writer._commit, commits=True)
    answer = capture(authorizations, HOSPITAL, authorization_id, 10_000)
    assert (answer.status, answer.captured_amount_fen) == (CAPTURED, 10_000)
    cannot_be_voided(authorizations, authorization_id)
    assert figures(relationships, relationship_id) == (10_000, 0, 10_000)
    assert ledger(harness, relationship_id).spent_fen == 10_000


def test_a_capture_cancelled_by_its_deadline_is_still_settled_by_its_write(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    relationship_id, authorization_id = hospital_hold(registry, relationships, authorizations)
    real = writer._commit

    def slow(units: list[CaptureUnit]) -> list[Outcome]:
        time.sleep(1.0)  # the client gives up meanwhile; the transaction then commits
        return real(units)

    writer._commit = slow
    key = new_id("capture")
    request = pb.CaptureRequest(authorization_id=authorization_id, idempotency_key=key)
    with pytest.raises(grpc.RpcError) as gave_up:
        authorizations.Capture(request, metadata=HOSPITAL, timeout=0.3)
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.5)  # the write ends, and the hold with it
    writer._commit = real
    assert get(authorizations, HOSPITAL, authorization_id).status == CAPTURED
    cannot_be_voided(authorizations, authorization_id)
    assert figures(relationships, relationship_id) == (8_000, 0, 12_000)
    # the retry the till makes with the same key gets the first answer
    again = capture(authorizations, HOSPITAL, authorization_id, key=key)
    assert (again.status, again.captured_amount_fen) == (CAPTURED, 12_000)


def test_the_stop_waits_for_captures_whose_calls_were_cancelled(harness: Harness) -> None:
    """A capture left running after its call was cancelled is awaited by `finished` (a step of
    the stop, before Redis and SQL close), so its hold is settled by its write, not left
    CAPTURING for the next start's reconcile."""
    service = harness.app.authorizations

    async def scenario() -> tuple[bool, bool]:
        ended = asyncio.Event()

        async def capture_write() -> None:
            await asyncio.sleep(0.3)
            ended.set()

        caller = asyncio.ensure_future(service.to_the_end.run(capture_write()))
        await asyncio.sleep(0.05)
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        before = ended.is_set()
        await service.to_the_end.finished()
        return before, ended.is_set()

    assert harness.run(scenario()) == (False, True)


class RacingForgets:
    """The hold store, with two retries' forget_unwritten calls made to meet: both have read
    the old decision; the first forgets it, and only then does the second try."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.arrived = 0
        self.both = asyncio.Event()
        self.first_done = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def forget_unwritten(self, call: Any, authorization_id: str) -> bool:
        self.arrived += 1
        if self.arrived == 2:
            self.both.set()
            await self.first_done.wait()
            return bool(await self.real.forget_unwritten(call, authorization_id))
        await self.both.wait()
        forgot = bool(await self.real.forget_unwritten(call, authorization_id))
        self.first_done.set()
        return forgot


def test_two_racing_retries_of_a_premium_never_written_get_the_one_payment(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    real_commit = writer._commit
    writer._commit = failing_commit(real_commit, commits=False)
    key = new_id("premium")
    try:
        with pytest.raises(grpc.RpcError):
            authorize(
                authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000,
                idempotency_key=key,
            )  # fmt: skip
    finally:
        writer._commit = real_commit
    service = harness.app.authorizations
    real_holds = service.holds
    racing = harness.run(_made_on_the_loop(lambda: RacingForgets(real_holds)))
    service.holds = racing
    answers: list[Any] = []

    def till() -> None:
        """Retries UNAVAILABLE (the payment being written) with the same key, as clients do."""
        for _ in range(50):
            try:
                answer = authorize(
                    authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000,
                    idempotency_key=key,
                )  # fmt: skip
                answers.append(answer)
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.05)

    try:
        tills = [threading.Thread(target=till) for _ in range(2)]
        for thread in tills:
            thread.start()
        for thread in tills:
            thread.join(20)
    finally:
        service.holds = real_holds
    assert racing.arrived >= 2  # (a till retrying UNAVAILABLE asks again)
    assert [(a.decision, a.status) for a in answers] == [(pb.DECISION_APPROVED, CAPTURED)] * 2
    assert answers[0].authorization_id == answers[1].authorization_id
    assert figures(relationships, relationship_id) == (5_000, 0, 15_000)
    assert ledger(harness, relationship_id).spent_fen == 15_000


async def _made_on_the_loop(make: Callable[[], Any]) -> Any:
    """Builds an object whose asyncio primitives belong to the harness's loop."""
    return make()


def test_a_retry_that_sees_the_sweeper_void_its_payment_is_told_to_retry_not_declined(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    writer: Any,
    service: Any,
) -> None:
    """The sweeper voids a payment never written between a retry's look at the key's decision
    and its read of the hold: that retry is answered UNAVAILABLE (retry), not DECLINED, which
    would be journaled under the key and then stand for the payment the next retry makes (found
    by an audit)."""
    fam = family(registry, relationships, 20_000)
    key = new_id("premium")
    left_capturing(authorizations, service, writer, fam, key, commits=False)
    deciding = harness.app.authorizations  # Authorize's decision, read again by a retry
    real_holds = deciding.holds
    sweeps = SweepStore(harness.app.pipelined_redis)

    class SweptMeanwhile:
        def __getattr__(self, name: str) -> Any:
            return getattr(real_holds, name)

        async def forget_unwritten(self, call: Any, authorization_id: str) -> bool:
            stands = await real_holds.forget_unwritten(call, authorization_id)  # still CAPTURING
            stalled_ms = int(harness.clock().timestamp() * 1000) + 3_600_000
            for stalled in await sweeps.stalled_captures_due(stalled_ms, 0):
                await settle_capture(harness.app.database, real_holds, stalled, stalled_ms)
            return bool(stands)

    deciding.holds = SweptMeanwhile()
    try:
        with pytest.raises(grpc.RpcError) as told:
            authorize(
                authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000,
                idempotency_key=key,
            )  # fmt: skip
    finally:
        deciding.holds = real_holds
    assert told.value.code() == grpc.StatusCode.UNAVAILABLE
    pays_once_when_retried(harness, relationships, authorizations, fam, key)
    harness.run(harness.app.journal.flush())

    def journaled(session: Any) -> list[str]:
        query = select(AuthorizationRow.decision).where(AuthorizationRow.idempotency_key == key)
        return list(session.scalars(query))

    assert harness.app.database.transaction(journaled) == ["APPROVED"]
