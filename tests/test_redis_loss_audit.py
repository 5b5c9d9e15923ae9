"""Audit of the Redis-loss healing (issue 12): money bugs found where a loss meets a call that is
half-way through (a one-step payment being written, a call cancelled by its deadline, an
approval journaled while a rebuild read SQL). Each test drives the real server through
tests/harness.py and compares Redis with the ledger (SQL) afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.exceptions import ResponseError
from sqlalchemy import func, select

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.generated.medwallet.v1 import registry_pb2, relationship_pb2
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.runtime.rebuild import RebuildAbandoned, rebuild_hot_state
from authz_server.service.capture_writer import CaptureUnit, CaptureWriter, Outcome
from authz_server.storage.redis import keys
from authz_server.storage.redis.generation import HotStateGeneration
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.sql.tables import CaptureRow, RelationshipRow
from tests.harness import ADMIN, APP, Harness, lose_redis, new_id
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import (
    CAPTURED,
    COLLECTOR,
    HOSPITAL,
    LTC_PREMIUM,
    MEDICAL,
    VOIDED,
    authorize,
    authorize_request,
    capture,
    dissolve,
    family,
    refund,
    refused,
    register_merchants,
    void,
)


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


@pytest.fixture()
def writer(harness: Harness) -> Iterator[CaptureWriter]:
    captures = harness.app.authorizations.captures.writer
    real_commit, real_submit = captures._commit, captures.submit
    yield captures
    captures._commit = real_commit  # type: ignore[method-assign]
    captures.submit = real_submit  # type: ignore[method-assign]


class HeldPublication:
    """The rebuild's publication of its generation (SET keys.GENERATION) waits until `go`."""

    def __init__(self, harness: Harness) -> None:
        self.commands = harness.app.pipelined_redis
        self.real = self.commands.execute
        self.go = threading.Event()

    async def execute(self, *arguments: Any) -> Any:
        if arguments[:2] == ("SET", keys.GENERATION) and not str(arguments[2]).startswith(
            "REBUILDING"
        ):
            while not self.go.is_set():
                await asyncio.sleep(0.02)
        return await self.real(*arguments)

    def __enter__(self) -> HeldPublication:
        self.commands.execute = self.execute  # type: ignore[method-assign]
        return self

    def __exit__(self, *_: object) -> None:
        self.go.set()
        self.commands.execute = self.real  # type: ignore[method-assign]


def lose_redis_until_page_written(harness: Harness, beneficiary_id: str) -> Any:
    """FLUSHALL; returns once the rebuild has written this beneficiary's page (its slot is
    marked), the rebuild's previous report (see wait_rebuilt)."""
    app = harness.app
    before = app.guardian.last_rebuild
    harness.run(harness.client.flushall())
    marker = keys.generation_marker(keys.prefix(beneficiary_id))
    deadline = time.monotonic() + 20
    while not harness.run(harness.client.exists(marker)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return before


def wait_rebuilt(harness: Harness, before: Any) -> None:
    app = harness.app
    deadline = time.monotonic() + 20
    while app.guardian.last_rebuild is before or not app.guardian.ready:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def unused_in_sql(harness: Harness, relationship_id: str) -> int:
    """The relationship row's unused figure, one read (for waiting on a commit; `ledger`
    cross-checks two reads, which a commit in between would fail)."""
    row = harness.app.database.transaction(
        lambda session: session.get(RelationshipRow, relationship_id)
    )
    return int(
        row.allocated_total_fen
        - row.released_total_fen
        - row.captured_total_fen
        + row.refunded_to_quota_total_fen
    )


def captures_of(harness: Harness, beneficiary_id: str) -> int:
    return int(
        harness.app.database.transaction(
            lambda session: session.scalar(
                select(func.count())
                .select_from(CaptureRow)
                .where(CaptureRow.beneficiary_id == beneficiary_id)
            )
        )
    )


def test_a_premium_whose_call_timed_out_is_not_paid_again_by_its_retry_after_redis_loss(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    """A one-step payment's capture commits after its caller's deadline passed: the capture
    runs to its end, but the decision's journal row was never written (the cancelled call
    never got that far). Redis is then lost; the till's retry with the same key must get the
    payment already made, not pay a second time (nor be declined for want of the money the
    first attempt took)."""
    fam = family(registry, relationships, 40_000)
    (relationship_id,) = fam.relationship_ids
    real = writer._commit

    def slow(units: list[CaptureUnit]) -> list[Outcome]:
        time.sleep(1.0)  # the client gives up meanwhile; the transaction then commits
        return real(units)

    writer._commit = slow
    key = new_id("premium")
    request = authorize_request(fam.beneficiary_id, LTC_PREMIUM, 15_000, idempotency_key=key)
    with pytest.raises(grpc.RpcError) as gave_up:
        authorizations.Authorize(request, metadata=COLLECTOR, timeout=0.3)
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.5)  # the payment is written, and its hold finished
    writer._commit = real
    assert captures_of(harness, fam.beneficiary_id) == 1

    lose_redis(harness)

    again = authorize(
        authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000, idempotency_key=key
    )
    assert (again.decision, again.status) == (pb.DECISION_APPROVED, CAPTURED)
    assert captures_of(harness, fam.beneficiary_id) == 1, "the retry paid a second time"
    assert ledger(harness, relationship_id).spent_fen == 15_000


def test_a_premium_written_across_a_rebuild_leaves_redis_equal_to_the_ledger(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    """A one-step payment decided before Redis was lost whose capture commits after the
    rebuild read SQL: the rebuild counted its money as unused (no journal row, no capture yet)
    and put no hold back, so its capture_finish finds nothing. Redis must not go on offering
    the money the payment took."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    gate, arrived = threading.Event(), threading.Event()
    real_submit = writer.submit

    async def gated(unit: CaptureUnit) -> Any:
        arrived.set()  # decided in Redis; its capture waits to be written
        while not gate.is_set():
            await asyncio.sleep(0.02)
        return await real_submit(unit)

    writer.submit = gated
    answers: list[Any] = []
    payer = threading.Thread(
        target=lambda: answers.append(
            authorize(authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000)
        )
    )
    payer.start()
    assert arrived.wait(5)
    lose_redis(harness)
    gate.set()
    payer.join(10)
    assert answers and answers[0].status == CAPTURED
    assert ledger(harness, relationship_id).unused_fen == 5_000
    assert sum(hot_figures(harness, fam.beneficiary_id, relationship_id)) == 5_000, (
        "Redis offers money the payment spent"
    )


def test_an_approval_journaled_after_the_rebuild_read_sql_does_not_overcommit_the_quota(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    fam = family(registry, relationships, 10_000)
    (relationship_id,) = fam.relationship_ids
    app = harness.app
    journal = app.journal
    real_write = journal.write
    gate, arrived = threading.Event(), threading.Event()
    first = [True]

    async def gated(row: dict[str, Any]) -> Any:
        if first[0]:
            first[0] = False
            arrived.set()  # decided in Redis; its journal row waits to be written
            while not gate.is_set():
                await asyncio.sleep(0.02)
        return await real_write(row)

    journal.write = gated  # type: ignore[method-assign]
    try:
        answers: list[Any] = []

        def first_call_of_the_till() -> None:
            try:
                answers.append(
                    authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
                )
            except grpc.RpcError as error:
                answers.append(error.code())

        first_call = threading.Thread(target=first_call_of_the_till)
        first_call.start()
        assert arrived.wait(5)
        lose_redis(harness)  # the rebuild reads SQL without the first decision
        second = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
        gate.set()
        first_call.join(15)
    finally:
        journal.write = real_write  # type: ignore[method-assign]
    # The first decision was made in the lost Redis: the journal refuses it (the till is told
    # UNAVAILABLE and retries), so the rebuilt quota's approval to the second call stands.
    assert answers == [grpc.StatusCode.UNAVAILABLE]
    assert second.approved_amount_fen == 8_000
    available, held = hot_figures(harness, fam.beneficiary_id, relationship_id)
    assert (available, held) == (2_000, 8_000)
    assert available + held == ledger(harness, relationship_id).unused_fen


def test_a_capture_written_across_a_rebuild_cannot_also_be_voided(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
    gate, arrived = threading.Event(), threading.Event()
    real_submit = writer.submit

    async def gated(unit: CaptureUnit) -> Any:
        arrived.set()  # claimed in Redis; its SQL write waits
        while not gate.is_set():
            await asyncio.sleep(0.02)
        return await real_submit(unit)

    writer.submit = gated
    outcomes: list[Any] = []

    def capture_it() -> None:
        try:
            outcomes.append(capture(authorizations, HOSPITAL, held.authorization_id).status)
        except grpc.RpcError as error:
            outcomes.append(error.code())

    capturer = threading.Thread(target=capture_it)
    capturer.start()
    assert arrived.wait(5)
    lose_redis(harness)  # the hold is open in SQL: put back PENDING (rs = 1)
    try:
        voided = void(authorizations, HOSPITAL, held.authorization_id).status
    except grpc.RpcError as error:
        voided = error.code()
    gate.set()
    capturer.join(10)
    assert not (voided == VOIDED and outcomes == [CAPTURED]), "voided and captured both"
    assert sum(hot_figures(harness, fam.beneficiary_id, relationship_id)) == (
        ledger(harness, relationship_id).unused_fen
    )


def test_a_capture_committed_while_the_rebuild_runs_finishes_its_put_back_hold(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    """A capture claimed before Redis was lost commits after the rebuild put its hold back
    (rs = 1) but before the rebuild published its generation: its capture_finish is refused
    (REBUILDING). The put-back hold must not stay PENDING holding money SQL counts as spent:
    a void (or its expiry) would then give that money back to the quota a second time."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
    capture_gate, arrived = threading.Event(), threading.Event()
    real_submit = writer.submit

    async def gated(unit: CaptureUnit) -> Any:
        arrived.set()
        while not capture_gate.is_set():
            await asyncio.sleep(0.02)
        return await real_submit(unit)

    writer.submit = gated
    outcomes: list[Any] = []

    def capture_it() -> None:
        try:
            outcomes.append(capture(authorizations, HOSPITAL, held.authorization_id, 5_000))
        except grpc.RpcError as error:
            outcomes.append(error.code())

    capturer = threading.Thread(target=capture_it)
    capturer.start()
    assert arrived.wait(5)

    # The rebuild's publication of its generation waits until the capture has committed.
    with HeldPublication(harness) as publication:
        before = lose_redis_until_page_written(harness, fam.beneficiary_id)
        capture_gate.set()
        deadline = time.monotonic() + 20
        while unused_in_sql(harness, relationship_id) != 15_000:  # committed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # its capture_finish is refused meanwhile: the rebuild goes on
        publication.go.set()
        capturer.join(15)
        wait_rebuilt(harness, before)
    assert outcomes and outcomes[0] != grpc.StatusCode.UNAVAILABLE, outcomes
    assert ledger(harness, relationship_id).unused_fen == 15_000
    with contextlib.suppress(grpc.RpcError):  # refused: it is captured
        void(authorizations, HOSPITAL, held.authorization_id)
    available, held_fen = hot_figures(harness, fam.beneficiary_id, relationship_id)
    assert (available, held_fen) == (15_000, 0), "Redis gave money SQL counts as spent back"


@pytest.mark.parametrize("movement", ["refund", "allocation"])
def test_money_credited_while_the_rebuild_runs_reaches_the_rebuilt_quota(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, movement: str
) -> None:
    """A refund (or an allocation) that commits after the rebuild wrote its quota but before
    the generation is published: its credit is refused (REBUILDING). Given up, Redis would
    understate the quota until a reconcile: declines for money the family has."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    paid = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
    capture(authorizations, HOSPITAL, paid.authorization_id)
    assert ledger(harness, relationship_id).unused_fen == 12_000
    outcomes: list[Any] = []

    def move() -> None:
        try:
            if movement == "refund":
                outcomes.append(refund(authorizations, HOSPITAL, paid.authorization_id, 3_000))
            else:
                outcomes.append(
                    relationships.AllocateQuota(
                        relationship_pb2.AllocateQuotaRequest(
                            relationship_id=relationship_id,
                            amount_fen=3_000,
                            idempotency_key=new_id("alloc"),
                        ),
                        metadata=APP,
                    )
                )
        except grpc.RpcError as error:
            outcomes.append(error.code())

    with HeldPublication(harness) as publication:
        before = lose_redis_until_page_written(harness, fam.beneficiary_id)
        mover = threading.Thread(target=move)
        mover.start()
        deadline = time.monotonic() + 20
        while unused_in_sql(harness, relationship_id) != 15_000:  # committed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # its credit is refused meanwhile: the rebuild goes on
        publication.go.set()
        mover.join(15)
        wait_rebuilt(harness, before)
    available, held_fen = hot_figures(harness, fam.beneficiary_id, relationship_id)
    assert (available, held_fen) == (15_000, 0), outcomes


@pytest.mark.parametrize("how", ["dissolve", "insurance_event"])
def test_a_dissolution_committed_while_the_rebuild_runs_reaches_the_rebuilt_quota(
    harness: Harness, registry: Any, relationships: Any, how: str
) -> None:
    """A dissolution that commits after the rebuild wrote its quota (ACTIVE, with its money)
    but before the generation is published: its quota_dissolve is refused (REBUILDING). Given
    up, Redis keeps offering the money SQL returned to the holder: approvals that no capture
    can take."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    outcomes: list[Any] = []

    def dissolve_it() -> None:
        try:
            if how == "dissolve":
                outcomes.append(dissolve(relationships, relationship_id))
            else:
                outcomes.append(
                    registry.ReportInsuranceEvent(
                        registry_pb2.ReportInsuranceEventRequest(
                            participant_id=fam.holder_ids[0],
                            event_type=registry_pb2.INSURANCE_EVENT_TYPE_TERMINATED,
                            termination_reason=registry_pb2.TERMINATION_REASON_WITHDRAWAL,
                        ),
                        metadata=ADMIN,
                    )
                )
        except grpc.RpcError as error:
            outcomes.append(error.code())

    with HeldPublication(harness) as publication:
        before = lose_redis_until_page_written(harness, fam.beneficiary_id)
        dissolver = threading.Thread(target=dissolve_it)
        dissolver.start()
        deadline = time.monotonic() + 20
        while unused_in_sql(harness, relationship_id) != 0:  # committed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # its quota_dissolve is refused meanwhile: the rebuild goes on
        publication.go.set()
        dissolver.join(15)
        wait_rebuilt(harness, before)
    quota = keys.quota(fam.beneficiary_id, relationship_id)
    status = harness.run(harness.client.hget(quota, "status"))
    assert status == b"DISSOLVED", outcomes


def test_a_void_of_a_put_back_hold_whose_capture_commits_first_is_refused(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    writer: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other order: the capture's transaction has locked the authorization (its write is
    slow) when the void of the put-back hold marks it: the void waits, finds the capture, and
    is refused ALREADY_CAPTURED; Redis (which voided the hold) is set from the ledger."""
    from authz_server.storage.sql import capture_batch

    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
    gate, arrived, writing = threading.Event(), threading.Event(), threading.Event()
    real_submit, real_write = writer.submit, capture_batch.write

    async def gated(unit: CaptureUnit) -> Any:
        arrived.set()
        while not gate.is_set():
            await asyncio.sleep(0.02)
        return await real_submit(unit)

    def slow_write(connection: Any, accepted: Any) -> None:
        real_write(connection, accepted)
        writing.set()
        time.sleep(1.0)  # the transaction holds its locks; the void comes meanwhile

    writer.submit = gated
    monkeypatch.setattr(capture_batch, "write", slow_write)
    outcomes: list[Any] = []

    def capture_it() -> None:
        try:
            outcomes.append(capture(authorizations, HOSPITAL, held.authorization_id).status)
        except grpc.RpcError as error:
            outcomes.append(error.code())

    capturer = threading.Thread(target=capture_it)
    capturer.start()
    assert arrived.wait(5)
    lose_redis(harness)  # the hold is open in SQL: put back PENDING (rs = 1)
    gate.set()
    assert writing.wait(5)
    refused(
        lambda: void(authorizations, HOSPITAL, held.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )
    capturer.join(10)
    assert outcomes == [CAPTURED]
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (12_000, 0)
    assert ledger(harness, relationship_id).unused_fen == 12_000


def test_a_slot_marked_lazily_while_a_rebuild_begins_is_not_used_mid_rebuild(
    tmp_path: Path,
) -> None:
    """A script refused an unused slot (MWUNMARKED); resolve read a complete generation, and a
    rebuild began (REBUILDING, its sweep) before resolve's mark landed: the slot now carries
    the old generation in an emptied Redis, and the script sent again would decide on it
    (RELATIONSHIP_NOT_FOUND for a family whose quotas the rebuild has not written yet). The
    mark must only count while the generation it was made for is still the published one."""
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()

    async def scenario() -> tuple[bool, Any]:
        commands = PipelinedRedis.from_url(url, timeout_seconds=2.0)
        generation = HotStateGeneration()
        generation.value = "g1"
        await commands.execute("SET", keys.GENERATION, "g1|run")
        marker = keys.generation_marker(keys.prefix("beneficiary-x"))
        await commands.execute("SET", keys.witness(keys.slot(marker)), "g1")  # rebuilt: g1
        real = commands.execute_many

        async def racing(batch: Any) -> Any:
            if any(command[:2] == ("SET", marker) for command in batch):
                # the rebuild begins, and its sweep passes the (still empty) slot
                await real([("SET", keys.GENERATION, "REBUILDING|g2"), ("DEL", marker)])
            return await real(batch)

        commands.execute_many = racing  # type: ignore[method-assign]
        try:
            again = await generation.resolve(commands, [ResponseError(f"MWUNMARKED {marker}")])
            return again, await real([("GET", marker)])
        finally:
            await commands.aclose()

    try:
        again, (mark,) = asyncio.run(scenario())
    finally:
        redis.stop()
    assert not again, f"the script would be sent again mid-rebuild on a slot marked {mark!r}"
    # ... and the mark is taken back: left, the rebuild would take it for a late page of an
    # earlier rebuild (LatePageFound) or, in a slot it does not write, forget its generation
    assert mark is None


def test_a_premium_retried_while_its_first_attempt_is_written_across_a_loss_pays_once(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    fam = family(registry, relationships, 40_000)
    (relationship_id,) = fam.relationship_ids
    gate, arrived = threading.Event(), threading.Event()
    real_submit = writer.submit
    first = [True]

    async def gated(unit: CaptureUnit) -> Any:
        if first[0]:
            first[0] = False
            arrived.set()  # the first attempt's payment waits to be written
            while not gate.is_set():
                await asyncio.sleep(0.02)
        return await real_submit(unit)

    writer.submit = gated
    key = new_id("premium")
    answers: list[Any] = []

    def pay() -> None:
        answers.append(
            authorize(
                authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000,
                idempotency_key=key,
            )
        )  # fmt: skip

    attempt = threading.Thread(target=pay)
    attempt.start()
    assert arrived.wait(5)
    lose_redis(harness)
    retry = threading.Thread(target=pay)  # the till's deadline passed: it retries
    retry.start()
    retry.join(10)
    gate.set()
    attempt.join(10)
    assert len(answers) == 2
    assert captures_of(harness, fam.beneficiary_id) == 1, "the premium was paid twice"
    assert ledger(harness, relationship_id).spent_fen == 15_000


def test_a_rebuild_taken_over_by_another_server_does_not_publish_its_generation(
    harness: Harness, tmp_path: Path
) -> None:
    """A rebuild whose lock expired (its renewals failed) goes on until it looks at its lock
    again; meanwhile another server took the lock, marked REBUILDING with its own generation
    and swept Redis. The first must not then publish its generation over the second's
    rebuild: servers would adopt it and decide on slots the second rebuild emptied."""
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()

    async def scenario() -> tuple[str, Any]:
        commands = PipelinedRedis.from_url(url, timeout_seconds=5.0)
        real = commands.execute

        async def execute(*arguments: Any) -> Any:
            # the publication (a SET, or a script), not the REBUILDING mark
            publishing = keys.GENERATION in arguments and not (
                arguments[0] == "SET" and str(arguments[2]).startswith("REBUILDING")
            )
            if publishing:
                await real("SET", keys.GENERATION, "REBUILDING|second")  # the other server
            return await real(*arguments)

        commands.execute = execute  # type: ignore[method-assign]
        outcome = "published"
        try:
            await rebuild_hot_state(harness.app.database, commands, "run", None, harness.clock)
        except RebuildAbandoned:
            outcome = "abandoned"
        try:
            return outcome, await real("GET", keys.GENERATION)
        finally:
            await commands.aclose()

    try:
        outcome, published = harness.run(scenario())
    finally:
        redis.stop()
    assert published == b"REBUILDING|second", (outcome, published)
    assert outcome == "abandoned"


def test_a_premium_whose_commit_reply_was_lost_across_a_rebuild_leaves_redis_equal_to_sql(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    """As the premium written across a rebuild, but its COMMIT's reply is lost: the payment is
    settled as SQL says (captured), and its quota must be set from the ledger there too."""
    from sqlalchemy.exc import OperationalError

    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    gate, arrived = threading.Event(), threading.Event()
    real_submit, real_commit = writer.submit, writer._commit

    async def gated(unit: CaptureUnit) -> Any:
        arrived.set()
        while not gate.is_set():
            await asyncio.sleep(0.02)
        return await real_submit(unit)

    def commit_and_lose_the_reply(units: list[CaptureUnit]) -> list[Outcome]:
        real_commit(units)
        raise OperationalError("COMMIT", None, Exception("server closed the connection"))

    writer.submit = gated
    writer._commit = commit_and_lose_the_reply
    answers: list[Any] = []
    payer = threading.Thread(
        target=lambda: answers.append(
            authorize(authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000)
        )
    )
    payer.start()
    assert arrived.wait(5)
    lose_redis(harness)
    gate.set()
    payer.join(10)
    assert answers and answers[0].status == CAPTURED
    assert ledger(harness, relationship_id).unused_fen == 5_000
    assert sum(hot_figures(harness, fam.beneficiary_id, relationship_id)) == 5_000
