"""A capture claimed in Redis when Redis lost its data, whose SQL write committed after the
rebuild put its hold back (PENDING, rs = 1) and whose process then died before finishing that
hold, is settled as SQL says by the sweeper before the hold's expiry can give the captured money
back. Before, nothing ever finished such a hold: the sweeper settled only holds CAPTURING, and
at its expiry the hold was released as if never captured, Redis overstating the quota by the
captured amount until a reconcile (an approval the ledger then refuses at capture). Now the
rebuild lists every hold it puts back in its slot's capturing zset (keys.capturing) and the
capture index; the sweeper settles each as SQL says once STALE_CAPTURE_SECONDS have passed
(service/capture_recovery.settle_capture), and expiry waits for that settlement (lua/_lib.lua
expire_due, up to the hold's bound sb). Found by an audit; every test here fails without the
change (the first with Redis at (20,000, 0) against SQL's 8,000 unused).

Past its expiry, such a hold was answered expired (a void) or settled and expired (a capture)
even while a capture claimed in the lost Redis could still commit; now UNAVAILABLE until
CAPTURE_WRITE_DEADLINE_SECONDS after its put-back (lua/_lib.lua lost_claim_may_commit; the tests
of a lost claim that may commit, found by a later audit, fail without that fix)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from authz_server.domain.errors import Unavailable
from authz_server.domain.hot_state import OpenHold
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.service import capture_recovery
from authz_server.service.capture_writer import CaptureUnit
from authz_server.service.ports import (
    CAPTURE_WRITE_DEADLINE_SECONDS,
    CaptureOutcome,
    HoldStatus,
    QuotaRestore,
    VoidOutcome,
)
from authz_server.storage.redis import keys
from authz_server.storage.redis.rebuild_writer import page_commands
from authz_server.storage.redis.script_io import (
    PUT_BACK_SETTLEMENT_BOUND_SECONDS,
    STALE_CAPTURE_SECONDS,
)
from authz_server.storage.redis.sweep_store import SWEEP_LIMIT
from tests.harness import Harness, lose_redis
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    refused,
    register_merchants,
    void,
    wait_for,
)
from tests.test_capture_across_restore import PausedCapture, let_go_after
from tests.test_live_reconcile import redis_agrees_with_sql
from tests.test_redis_loss_audit import unused_in_sql
from tests.test_relationship_rules import dissolve
from tests.test_sweeper_index import MINUTE_MS, NOW_MS, Store, run

# How long a "dead" step waits before the test lets it go: longer than any test here runs.
DEAD_SECONDS = 300.0
# Past a medical hold's 24 hours (and so past STALE_CAPTURE_SECONDS as well).
PAST_EXPIRY_SECONDS = 86_401
# How long before its expiry the hold's capture is claimed in the test that captures it late.
EXPIRY_MARGIN_SECONDS = 15
# A few rounds of the running sweeper (one a second).
SWEEP_ROUNDS_SECONDS = 2.5
# How long the running sweeper (a round a second) may take to settle and expire.
SWEEP_WAIT_SECONDS = 20.0


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the tests of the scripts themselves (at the end)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("put_back") / "redis", persistent=False)
    yield server.start()
    server.stop()


class DeadCapture(PausedCapture):
    """A PausedCapture whose process "died": its paused steps wait until the test ends, and a
    write never let go before then never reaches SQL (it fails as a lost connection would,
    and is settled as SQL says)."""

    never_written = False  # set: the process dies before the SQL write, not after it

    async def _wait(self, event: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEAD_SECONDS
        while not event.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def submit(self, unit: CaptureUnit) -> Any:
        if unit.authorization_id != self.authorization_id:
            return await self.real_submit(unit)
        self.claimed.set()
        await self._wait(self.write)
        if self.never_written:
            raise Unavailable("the capture's process died before its SQL write")
        return await self.real_submit(unit)


@pytest.fixture()
def dead(harness: Harness, authorizations: Any) -> Iterator[Callable[[str], DeadCapture]]:
    yield from let_go_after(DeadCapture, harness, authorizations)


@pytest.fixture()
def sweeper_held_back(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """The running sweeper's settlement of stalled and put-back holds held back (a late round:
    many slots due, a Redis stall), so that a test past the window in which a claim lost with
    Redis may commit sees the scripts' own answers, not the sweeper's settlement. Returns what
    lets it go again."""
    real = capture_recovery.settle_stalled

    async def held_back(database: Any, holds: Any, stalled: list[str], now_ms: int) -> int:
        return 0

    monkeypatch.setattr(capture_recovery, "settle_stalled", held_back)
    return lambda: monkeypatch.setattr(capture_recovery, "settle_stalled", real)


def status(harness: Harness, authorization_id: str) -> HoldStatus | None:
    hold = harness.run(harness.app.holds.get(authorization_id))
    return None if hold is None else hold.status


def awaiting_settlement(harness: Harness, authorization_id: str) -> bool:
    """Whether the hold is in its slot's capturing zset (the sweeper will settle it)."""
    prefix = keys.prefix_of_authorization(authorization_id)
    score = harness.run(harness.client.zscore(keys.capturing(prefix), authorization_id))
    return score is not None


def near_expiry_across_a_rebuild(
    harness: Harness, authorizations: Any, dead: Callable[[str], DeadCapture], fam: Any
) -> tuple[str, DeadCapture]:
    """A hold of 12,000 whose capture is claimed shortly before its expiry, Redis lost and
    rebuilt (the hold put back PENDING, rs = 1), the capture's SQL write committed and its
    finish never coming (its process "died"); then the clock just past the hold's expiry, but
    less than STALE_CAPTURE_SECONDS after the rebuild: the running sweeper cannot settle it yet.
    Returns the authorization id and its dead capture."""
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    assert held.decision == APPROVED
    harness.clock.advance(PAST_EXPIRY_SECONDS - 1 - EXPIRY_MARGIN_SECONDS)
    step = dead(held.authorization_id)
    rebuilt_after_ms = now_ms_of(harness)
    step.commit_across_redis_loss(harness, 12_000)  # committed; its finish never comes
    assert unused_in_sql(harness, relationship_id) == 8_000
    assert status(harness, held.authorization_id) is HoldStatus.PENDING  # put back
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
    past_expiry(harness, held.authorization_id, rebuilt_after_ms)
    return held.authorization_id, step


def now_ms_of(harness: Harness) -> int:
    return int(harness.clock().timestamp() * 1000)


def past_expiry(harness: Harness, authorization_id: str, rebuilt_after_ms: int) -> None:
    """The clock just past the hold's expiry, which the test checks is less than
    STALE_CAPTURE_SECONDS after the rebuild (done after `rebuilt_after_ms`)."""
    hold = harness.run(harness.app.holds.get(authorization_id))
    assert hold is not None
    harness.clock.advance((hold.expires_ms - now_ms_of(harness)) / 1000 + 1)
    elapsed_ms = now_ms_of(harness) - rebuilt_after_ms
    assert elapsed_ms < STALE_CAPTURE_SECONDS * 1000 - 5_000, "the test ran too slow"


def test_a_capture_committed_across_a_rebuild_whose_finish_never_comes_is_settled_captured(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    dead: Callable[[str], DeadCapture],
) -> None:
    """Fails without the change: at the hold's expiry the sweeper gave the 12,000 back (Redis
    (20,000, 0) against SQL's 8,000 unused: an Authorize of 20,000 would be approved)."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    authorization_id, step = near_expiry_across_a_rebuild(harness, authorizations, dead, fam)

    time.sleep(SWEEP_ROUNDS_SECONDS)  # the running sweeper's rounds pass its expiry by
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
    assert status(harness, authorization_id) is HoldStatus.PENDING
    assert awaiting_settlement(harness, authorization_id)

    harness.clock.advance(STALE_CAPTURE_SECONDS)  # the sweeper settles it as SQL says
    wait_for(
        lambda: status(harness, authorization_id) is not HoldStatus.PENDING,
        seconds=SWEEP_WAIT_SECONDS,
    )
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
    assert status(harness, authorization_id) is HoldStatus.CAPTURED
    assert not awaiting_settlement(harness, authorization_id)
    # No money offered twice: what is left, and not a fen more.
    assert authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_001).decision == (
        DECLINED
    )
    assert authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000).decision == (
        APPROVED
    )

    step.release()  # the "dead" finish after all: the hold is finished, nothing moves
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (0, 8_000)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)


def test_a_put_back_hold_whose_capture_never_committed_is_settled_open_then_expires(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    dead: Callable[[str], DeadCapture],
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    step = dead(held.authorization_id)
    step.never_written = True
    step.start(12_000)  # claimed; its process dies before its SQL write
    lose_redis(harness)
    assert status(harness, held.authorization_id) is HoldStatus.PENDING
    assert awaiting_settlement(harness, held.authorization_id)  # fails without the change

    harness.clock.advance(STALE_CAPTURE_SECONDS + 5)  # settled as SQL says: open
    wait_for(
        lambda: not awaiting_settlement(harness, held.authorization_id),
        seconds=SWEEP_WAIT_SECONDS,
    )
    assert status(harness, held.authorization_id) is HoldStatus.PENDING
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)

    harness.clock.advance(PAST_EXPIRY_SECONDS)  # then it expires as any hold: money back
    wait_for(
        lambda: status(harness, held.authorization_id) is HoldStatus.EXPIRED,
        seconds=SWEEP_WAIT_SECONDS,
    )
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (20_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
    step.release()  # its write fails; settled as SQL says (nothing): nothing moves
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (20_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)


@pytest.mark.parametrize("same_key", [False, True], ids=["another-till", "its-till-retrying"])
def test_a_capture_of_the_expired_put_back_hold_is_answered_as_sql_says(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    dead: Callable[[str], DeadCapture],
    sweeper_held_back: Callable[[], None],
    same_key: bool,
) -> None:
    """A capture reaches the hold after its expiry, before the sweeper settled it:
    capture_begin's own expiry must not give the captured money back either (fails without the
    change: AUTHORIZATION_EXPIRED, the 12,000 back in Redis). The dead capture's till, retrying
    with its key, gets its capture's answer at once (SQL has it under its key). Another till is
    told to retry while a claim lost with Redis may still commit (STALE_CAPTURE_SECONDS after
    the put-back: lua/_lib.lua lost_claim_may_commit), then, the hold settled first (STALLED),
    ALREADY_CAPTURED."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    authorization_id, step = near_expiry_across_a_rebuild(harness, authorizations, dead, fam)
    if same_key:
        answer = capture(authorizations, HOSPITAL, authorization_id, 12_000, key=step.key)
        assert (answer.status, answer.captured_amount_fen) == (CAPTURED, 12_000)
    else:
        refused(
            lambda: capture(authorizations, HOSPITAL, authorization_id, 12_000),
            grpc.StatusCode.UNAVAILABLE,
            "UNAVAILABLE",
        )
        harness.clock.advance(STALE_CAPTURE_SECONDS)  # past the window; the sweeper is late
        refused(
            lambda: capture(authorizations, HOSPITAL, authorization_id, 12_000),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ALREADY_CAPTURED",
        )
    assert status(harness, authorization_id) is HoldStatus.CAPTURED
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)


def test_a_void_of_the_expired_put_back_hold_is_answered_expired_and_gives_nothing_back(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    dead: Callable[[str], DeadCapture],
    sweeper_held_back: Callable[[], None],
) -> None:
    """A Void after the expiry, before the settlement (the sweeper late), of a hold whose
    capture SQL does not have (its write never came; one SQL has is answered ALREADY_CAPTURED
    and finished as SQL says, as before: tests/test_capture_across_restore.py), put back
    STALE_CAPTURE_SECONDS before or more (so no capture claimed before can commit any more,
    whatever the servers' clocks; until then UNAVAILABLE, as the test after this one shows). SQL
    answers EXPIRED; void.lua must neither void the hold (answering OK for an expired one) nor
    release it before its settlement. Once settled open it expires."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    harness.clock.advance(PAST_EXPIRY_SECONDS - 1 - EXPIRY_MARGIN_SECONDS)
    step = dead(held.authorization_id)
    step.never_written = True
    rebuilt_after_ms = now_ms_of(harness)
    step.start(12_000)
    lose_redis(harness)
    past_expiry(harness, held.authorization_id, rebuilt_after_ms)
    harness.clock.advance(STALE_CAPTURE_SECONDS)  # past the window; the sweeper is late
    refused(
        lambda: void(authorizations, HOSPITAL, held.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHORIZATION_EXPIRED",
    )
    assert status(harness, held.authorization_id) is HoldStatus.PENDING
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)

    sweeper_held_back()  # let go: settled open, then expired
    wait_for(
        lambda: status(harness, held.authorization_id) is HoldStatus.EXPIRED,
        seconds=SWEEP_WAIT_SECONDS,
    )
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (20_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)


@pytest.fixture()
def paused(harness: Harness, authorizations: Any) -> Iterator[Callable[[str], PausedCapture]]:
    yield from let_go_after(PausedCapture, harness, authorizations)


@pytest.mark.parametrize("call", ["void", "capture"])
@pytest.mark.parametrize("commits", [True, False], ids=["its-write-commits", "too-late-to"])
def test_past_the_expiry_a_put_back_hold_whose_lost_claim_may_commit_is_told_to_retry(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    paused: Callable[[str], PausedCapture],
    sweeper_held_back: Callable[[], None],
    call: str,
    commits: bool,
) -> None:
    """A capture is claimed 2 s before the hold's expiry; Redis is lost and rebuilt while its
    SQL write is under way (the hold put back PENDING, rs = 1, awaiting its settlement). Just
    past the expiry the till, its capture call timed out, voids (or another till captures).
    Before the fix (found by an audit) the void was answered FAILED_PRECONDITION
    AUTHORIZATION_EXPIRED (SQL: expired, no capture yet, no void mark; void.lua: awaiting its
    settlement, past its expiry), and the capture was settled as not captured and refused
    AUTHORIZATION_EXPIRED; then the first capture's write committed (within
    CAPTURE_WRITE_DEADLINE_SECONDS of its claim) and the family's quota was charged 12,000: the
    till was told nothing was taken for money that was. Without the Redis loss the same void is
    answered UNAVAILABLE (CAPTURE_IN_PROGRESS); so it is now, until no capture claimed in the
    lost Redis can commit any more (its write deadline, CAPTURE_WRITE_DEADLINE_SECONDS, after its
    claim; the scripts wait STALE_CAPTURE_SECONDS after the put-back, for clocks that differ
    between servers): then the retry gets ALREADY_CAPTURED, or AUTHORIZATION_EXPIRED as
    before (here the sweeper is late: the scripts' own answers)."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    hold = harness.run(harness.app.holds.get(held.authorization_id))
    assert hold is not None
    harness.clock.advance((hold.expires_ms - now_ms_of(harness)) / 1000 - 2)
    step = paused(held.authorization_id)
    rebuilt_after_ms = now_ms_of(harness)
    step.start(0)  # claimed before the expiry; its SQL write waits
    lose_redis(harness)  # the claim lost with Redis: the hold put back PENDING, rs = 1
    assert awaiting_settlement(harness, held.authorization_id)
    past_expiry(harness, held.authorization_id, rebuilt_after_ms)

    def void_or_capture() -> Any:
        if call == "void":
            return void(authorizations, HOSPITAL, held.authorization_id)
        return capture(authorizations, HOSPITAL, held.authorization_id, 12_000)

    with pytest.raises(grpc.RpcError) as told:
        void_or_capture()
    assert told.value.code() == grpc.StatusCode.UNAVAILABLE, told.value.details()
    if commits:
        first = step.end()  # its write goes on and commits
        assert (first.status, first.captured_amount_fen) == (CAPTURED, 12_000)
        assert unused_in_sql(harness, relationship_id) == 8_000
        refused(void_or_capture, grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_CAPTURED")
        assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
        redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
    else:
        harness.clock.advance(STALE_CAPTURE_SECONDS)  # its write can no longer commit
        refused(void_or_capture, grpc.StatusCode.FAILED_PRECONDITION, "AUTHORIZATION_EXPIRED")
        assert step.end() == grpc.StatusCode.UNAVAILABLE  # it waited too long to be written
        assert unused_in_sql(harness, relationship_id) == 20_000


# --- the scripts themselves, on a private redis-server (tests/test_sweeper_index.py's Store) ---


async def put_back(
    store: Store, fen: int, *, holds: int = 1, expires_in_ms: int = MINUTE_MS
) -> tuple[str, str, list[str]]:
    """A beneficiary with a quota of `fen` and `holds` holds of 1,000 fen each, expiring
    `expires_in_ms` after NOW_MS, written as a rebuild's page writes them at NOW_MS
    (page_commands): put back, listed for the sweeper. Returns (beneficiary, relationship,
    authorization ids)."""
    beneficiary_id, relationship_id = await store.quota(fen)
    created = datetime.fromtimestamp(NOW_MS / 1000, UTC)
    expires = created + timedelta(milliseconds=expires_in_ms)
    open_holds = [
        OpenHold(
            authorization_id=keys.new_authorization_id(beneficiary_id),
            merchant_id="sweeper-merchant",
            beneficiary_id=beneficiary_id,
            purpose="MEDICAL_OUT_OF_POCKET",
            decision="APPROVED",
            approved_fen=1_000,
            funding=((relationship_id, 1_000),),
            created_at=created,
            expires_at=expires,
        )
        for _ in range(holds)
    ]
    quota = QuotaRestore(relationship_id, beneficiary_id, "holder", True, fen, 1, "EMPLOYEE", 0)
    commands = page_commands("test-generation", [quota], open_holds, NOW_MS)
    for reply in await store.holds.commands.execute_many(commands):
        assert not isinstance(reply, Exception), reply
    return beneficiary_id, relationship_id, [hold.authorization_id for hold in open_holds]


EXPIRES_MS = NOW_MS + MINUTE_MS
SETTLE_BY_MS = NOW_MS + PUT_BACK_SETTLEMENT_BOUND_SECONDS * 1000
STALE_MS = STALE_CAPTURE_SECONDS * 1000


def test_a_rebuild_lists_every_hold_it_puts_back_for_the_sweeper(redis_url: str) -> None:
    async def body(store: Store) -> None:
        beneficiary_id, _, held = await put_back(store, 10_000, holds=2)
        capturing = keys.capturing(keys.prefix(beneficiary_id))
        listed = await store.admin.zrange(capturing, 0, -1)
        assert sorted(member.decode() for member in listed) == sorted(held)
        assert await store.admin.zscore(capturing, held[0]) == NOW_MS
        assert await store.due_score(keys.CAPTURES_BEGUN, beneficiary_id) == NOW_MS
        assert await store.sweeps.stalled_captures_due(NOW_MS + STALE_MS - 1, STALE_MS) == []
        found = await store.sweeps.stalled_captures_due(NOW_MS + STALE_MS, STALE_MS)
        assert sorted(found) == sorted(held)
        record = await store.holds.get(held[0])
        assert record is not None and record.put_back

    run(redis_url, body)


def test_expiry_waits_for_the_settlement_up_to_the_holds_bound(redis_url: str) -> None:
    async def body(store: Store) -> None:
        beneficiary_id, relationship_id, (held,) = await put_back(store, 10_000)
        expiry = keys.expiry(keys.prefix(beneficiary_id))
        assert await store.sweeps.sweep_due(EXPIRES_MS) == 0  # due, but awaiting: not released
        assert await store.status(held) == "PENDING"
        assert await store.figures(beneficiary_id, relationship_id) == (9_000, 1_000)
        assert await store.admin.zscore(expiry, held) == SETTLE_BY_MS  # due again at its bound
        assert await store.due_score(keys.DUE_HOLDS, beneficiary_id) == SETTLE_BY_MS
        assert await store.sweeps.sweep(EXPIRES_MS) == (0, 1)  # the full sweep ends too
        # Never settled (the sweeper could not): released at its bound, as before the change.
        assert await store.sweeps.sweep_due(SETTLE_BY_MS) == 1
        assert await store.status(held) == "EXPIRED"
        assert await store.figures(beneficiary_id, relationship_id) == (10_000, 0)

    run(redis_url, body)


def test_a_hold_settled_open_gets_its_own_expiry_back(redis_url: str) -> None:
    async def body(store: Store) -> None:
        beneficiary_id, relationship_id, (held,) = await put_back(store, 10_000)
        assert await store.sweeps.sweep_due(EXPIRES_MS) == 0  # moved to its bound
        assert await store.holds.clear_capture(held, EXPIRES_MS)  # SQL has no capture
        capturing = keys.capturing(keys.prefix(beneficiary_id))
        assert await store.admin.zscore(capturing, held) is None
        assert await store.admin.zscore(keys.expiry(keys.prefix(beneficiary_id)), held) == (
            EXPIRES_MS
        )
        assert await store.due_score(keys.DUE_HOLDS, beneficiary_id) == EXPIRES_MS
        assert await store.sweeps.sweep_due(EXPIRES_MS) == 1
        assert await store.status(held) == "EXPIRED"
        assert await store.figures(beneficiary_id, relationship_id) == (10_000, 0)

    run(redis_url, body)


def test_holds_awaiting_settlement_do_not_keep_other_due_holds_from_expiring(
    redis_url: str,
) -> None:
    """More awaiting holds than one expire call takes (SWEEP_LIMIT), and an ordinary hold due
    at the same time behind them: each call moves the awaiting ones out of the way."""

    async def body(store: Store) -> None:
        beneficiary_id, relationship_id, _ = await put_back(store, 1_000_000, holds=SWEEP_LIMIT + 5)
        ordinary = await store.hold(beneficiary_id, 7_000, EXPIRES_MS + 1)
        assert await store.sweeps.sweep_due(EXPIRES_MS + 1) == 1
        assert await store.status(ordinary) == "EXPIRED"
        assert await store.figures(beneficiary_id, relationship_id) == (
            1_000_000 - (SWEEP_LIMIT + 5) * 1_000,
            (SWEEP_LIMIT + 5) * 1_000,
        )

    run(redis_url, body)


def test_a_capture_or_void_after_the_expiry_leaves_an_awaiting_hold_for_its_settlement(
    redis_url: str,
) -> None:
    async def body(store: Store) -> None:
        beneficiary_id, relationship_id, (late, early) = await put_back(store, 10_000, holds=2)
        claim = await store.holds.capture_begin(late, "sweeper-merchant", "c1", 0, EXPIRES_MS)
        assert claim.outcome == CaptureOutcome.STALLED  # settle it as SQL says first
        void = await store.holds.void(late, "sweeper-merchant", EXPIRES_MS)
        assert void == VoidOutcome.AUTHORIZATION_EXPIRED
        assert await store.status(late) == "PENDING"
        # Before its expiry a capture claims it as any hold: its own claim from then on.
        claim = await store.holds.capture_begin(early, "sweeper-merchant", "c2", 0, NOW_MS + 1)
        assert claim.outcome == CaptureOutcome.OK
        capturing = keys.capturing(keys.prefix(beneficiary_id))
        assert await store.admin.zscore(capturing, early) == NOW_MS + 1
        assert not await store.holds.clear_capture(early, EXPIRES_MS)  # the claim's: left
        assert await store.admin.zscore(capturing, early) == NOW_MS + 1
        assert await store.figures(beneficiary_id, relationship_id) == (8_000, 2_000)

    run(redis_url, body)


def test_past_its_expiry_a_put_back_hold_is_in_progress_while_a_lost_claim_may_commit(
    redis_url: str,
) -> None:
    """A put-back hold that expires sooner after the rebuild than STALE_CAPTURE_SECONDS: a
    capture claimed in the Redis that was lost may commit until CAPTURE_WRITE_DEADLINE_SECONDS
    after its claim, by its own server's clock, and the rebuild listed the hold by the
    rebuilding server's: so a capture or void past its expiry is told one is in progress until
    the sweeper's bound (lua/_lib.lua lost_claim_may_commit); from then on, STALLED and
    AUTHORIZATION_EXPIRED as above. At the bare deadline after the listing (what the scripts
    allowed before) a server whose clock runs ahead of the rebuilder's would settle the hold as
    not captured and answer AUTHORIZATION_EXPIRED while the lost claim could still commit."""
    deadline_ms = CAPTURE_WRITE_DEADLINE_SECONDS * 1000
    window_ms = STALE_CAPTURE_SECONDS * 1000

    async def body(store: Store) -> None:
        beneficiary_id, relationship_id, (held,) = await put_back(
            store, 10_000, expires_in_ms=deadline_ms // 2
        )
        # this server's clock 0 s, 5 s and 20 s ahead of the rebuilder's, at the claim's deadline
        ahead = [NOW_MS + deadline_ms - 1 + skew_ms for skew_ms in (0, 5_000, 19_999)]
        for now_ms in (NOW_MS + deadline_ms // 2, *ahead, NOW_MS + window_ms - 1):
            claim = await store.holds.capture_begin(held, "sweeper-merchant", "c1", 0, now_ms)
            assert claim.outcome == CaptureOutcome.IN_PROGRESS, now_ms - NOW_MS
            void = await store.holds.void(held, "sweeper-merchant", now_ms)
            assert void == VoidOutcome.CAPTURE_IN_PROGRESS, now_ms - NOW_MS
        now_ms = NOW_MS + window_ms
        claim = await store.holds.capture_begin(held, "sweeper-merchant", "c1", 0, now_ms)
        assert claim.outcome == CaptureOutcome.STALLED
        void = await store.holds.void(held, "sweeper-merchant", now_ms)
        assert void == VoidOutcome.AUTHORIZATION_EXPIRED
        assert await store.status(held) == "PENDING"  # left for its settlement
        assert await store.figures(beneficiary_id, relationship_id) == (9_000, 1_000)

    run(redis_url, body)


def test_a_quota_dissolved_while_its_put_back_hold_waits_leaves_the_captured_part_spent(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    dead: Callable[[str], DeadCapture],
) -> None:
    """A hold funded by two quotas, put back by a rebuild, its capture committed and its finish
    never coming; the first quota's relationship is dissolved. Voiding the hold there (as the
    dissolution does an open hold) gave its captured part on the second quota back: Redis
    (10,000, 0) against SQL's 5,000 (found by the audit). The hold waits for its settlement,
    which finishes it captured."""
    fam = family(registry, relationships, 10_000, 10_000)
    first, second = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    assert [(part.relationship_id, part.amount_fen) for part in held.funding] == [
        (first, 10_000),
        (second, 5_000),
    ]
    step = dead(held.authorization_id)
    step.commit_across_redis_loss(harness, 0)  # all of it; its finish never comes
    assert unused_in_sql(harness, second) == 5_000
    dissolve(relationships, first)

    available, _ = hot_figures(harness, fam.beneficiary_id, second)
    assert available <= 5_000, "the captured part is offered again"
    assert status(harness, held.authorization_id) is HoldStatus.PENDING
    harness.clock.advance(STALE_CAPTURE_SECONDS)  # the sweeper settles it as SQL says
    wait_for(
        lambda: status(harness, held.authorization_id) is not HoldStatus.PENDING,
        seconds=SWEEP_WAIT_SECONDS,
    )
    assert status(harness, held.authorization_id) is HoldStatus.CAPTURED
    assert hot_figures(harness, fam.beneficiary_id, second) == (5_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, second)


def test_a_put_back_hold_not_captured_whose_quota_was_dissolved_is_voided_at_settlement(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    dead: Callable[[str], DeadCapture],
) -> None:
    """The same, its capture never written: the settlement voids it as the dissolution would
    have (its part on the second quota back at once, a later capture refused), rather than
    leaving the second quota's money held until the hold's expiry."""
    fam = family(registry, relationships, 10_000, 10_000)
    first, second = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    step = dead(held.authorization_id)
    step.never_written = True
    step.start(0)
    lose_redis(harness)
    dissolve(relationships, first)
    step.write.set()  # the write fails: nothing in SQL
    harness.clock.advance(STALE_CAPTURE_SECONDS)
    wait_for(
        lambda: status(harness, held.authorization_id) is HoldStatus.VOIDED,
        seconds=SWEEP_WAIT_SECONDS,
    )
    assert hot_figures(harness, fam.beneficiary_id, second) == (10_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, second)
    with pytest.raises(grpc.RpcError) as refusal:
        capture(authorizations, HOSPITAL, held.authorization_id)
    assert refusal.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_waiting_hold_one_of_whose_quotas_was_dissolved_is_refused_even_for_the_other_part(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
) -> None:
    """A dissolution voids the relationship's open holds, whole; a put-back hold awaiting its
    settlement is left pending in Redis (lua/quota_dissolve.lua), so the ledger refuses its
    capture, also one that takes nothing from the dissolved quota (found by the audit: such a
    capture of the other quota's part was accepted)."""
    fam = family(registry, relationships, 10_000, 10_000)
    first, second = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    assert [(part.relationship_id, part.amount_fen) for part in held.funding] == [
        (first, 10_000),
        (second, 5_000),
    ]
    lose_redis(harness)  # every open hold put back, and listed for the sweeper
    assert awaiting_settlement(harness, held.authorization_id)
    dissolve(relationships, second)
    assert status(harness, held.authorization_id) is HoldStatus.PENDING  # left to settlement

    with pytest.raises(grpc.RpcError) as refusal:
        capture(authorizations, HOSPITAL, held.authorization_id, 10_000)  # the first's part only
    assert refusal.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refusal.value.details()
    assert hot_figures(harness, fam.beneficiary_id, first) == (10_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, first)
