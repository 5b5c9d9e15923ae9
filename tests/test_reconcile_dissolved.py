"""A dissolution whose Redis step was lost (runtime/reconcile_dissolved.py): SQL dissolved the
relationship and gave its unused money back to the holder, but Redis still has the quota active,
so Authorize approves on money that is gone. The rolling reconcile's dissolutions cursor finds
it once the dissolution is SETTLED_AFTER_SECONDS old, and dissolves it in Redis (voiding the
holds placed on it meanwhile), counted as drift."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import redis
from prometheus_client import REGISTRY

from authz_server.domain.types import Channel, InsuranceEventType, Party, TerminationReason
from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.runtime import reconcile_dissolved, rolling_reconcile
from authz_server.runtime.reconcile import ReconcileReport
from authz_server.runtime.reconcile_dissolved import (
    SETTLED_AFTER_SECONDS,
    parse_cursor,
    reconcile_dissolved_page,
)
from authz_server.service import ledger as ledger_module
from authz_server.service.registry import InsuranceEvent
from authz_server.storage.redis import keys
from tests.harness import Harness, lose_redis, own_harness
from tests.test_authorization_recovery import ledger
from tests.test_authorization_rules import (
    APPROVED,
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    dissolve,
    family,
    get,
    refused,
    register_merchants,
    void,
    wait_for,
)
from tests.test_reconcile_drift import family_with_a_hold
from tests.test_redis_loss import served_stubs
from tests.test_rolling_reconcile import rolling_page


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A server of its own whose rolling reconcile is off: the test takes the turns."""
    yield from own_harness(tmp_path_factory.mktemp("reconcile-dissolved"))


@pytest.fixture(scope="module")
def stubs(server: Harness) -> Iterator[Any]:
    yield from served_stubs(server)


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def settled_clock() -> datetime:
    """A clock late enough that every dissolution made so far is settled."""
    return datetime.now(UTC) + timedelta(seconds=SETTLED_AFTER_SECONDS + 1)


def dissolved_with_its_redis_step_lost(
    harness: Harness, relationships: Any, beneficiary_id: str, relationship_id: str
) -> None:
    """Dissolves the relationship, then puts back every key of the beneficiary's Redis slot as
    it was before: as if the server had died between its SQL commit and its Redis step (or
    Redis had failed over to a replica that missed the script)."""
    client = harness.admin()
    assert isinstance(client, redis.Redis)
    try:
        found = list(client.scan_iter(match=keys.prefix(beneficiary_id) + "*", count=1000))
        saved = {key: (client.dump(key), client.pttl(key)) for key in found}
        dissolve(relationships, relationship_id)
        assert client.hget(keys.quota(beneficiary_id, relationship_id), "status") == b"DISSOLVED"
        for key in client.scan_iter(match=keys.prefix(beneficiary_id) + "*", count=1000):
            client.delete(key)
        for key, (value, ttl) in saved.items():
            assert isinstance(value, bytes)
            client.restore(key, max(ttl, 0), value, replace=True)
        assert client.hget(keys.quota(beneficiary_id, relationship_id), "status") == b"ACTIVE"
    finally:
        client.close()


def pages_until_past(
    harness: Harness, relationship_id: str, clock: Any = settled_clock
) -> tuple[str, ReconcileReport]:
    """Dissolution pages from the first until one has passed `relationship_id`: (the cursor,
    the pages' reports added up)."""
    app = harness.app
    cursor, total = "", ReconcileReport(quotas=0, drifted=0, drift_fen=0)
    for _ in range(1_000):
        moved_to, report = harness.run(
            reconcile_dissolved_page(app.database, app.quotas, cursor, 2, clock)
        )
        total = total.plus(report)
        if moved_to == cursor:  # nothing more, settled, after the cursor
            return cursor, total
        cursor = moved_to
        if cursor.endswith("|" + relationship_id):
            return cursor, total
    raise AssertionError("the cursor did not move on")


def test_a_dissolution_whose_redis_step_was_lost_is_made_in_redis_and_its_holds_voided(
    server: Harness, stubs: Any
) -> None:
    registry, relationships, authorizations, _ = stubs
    beneficiary_id, relationship_id = family_with_a_hold(registry, relationships, authorizations)
    dissolved_with_its_redis_step_lost(server, relationships, beneficiary_id, relationship_id)
    assert ledger(server, relationship_id).unused_fen == 0  # the holder has the money back

    # The fault: Redis still lets money the ledger gave back be authorized.
    stale = authorize(authorizations, HOSPITAL, beneficiary_id, MEDICAL, 3_000)
    assert stale.decision == APPROVED

    cursor, report = pages_until_past(server, relationship_id)
    assert cursor.endswith("|" + relationship_id)
    assert report.drifted >= 1 and report.overstated >= 1 and report.failed == 0
    assert report.drift_fen >= 20_000  # available 12,000 + held 8,000 (two holds) at least

    client = server.admin()
    try:
        quota = client.hmget(keys.quota(beneficiary_id, relationship_id), "status", "available")
        assert quota == [b"DISSOLVED", b"0"]
    finally:
        client.close()
    assert (
        get(authorizations, HOSPITAL, stale.authorization_id).status
        == pb.AUTHORIZATION_STATUS_VOIDED
    )
    again = authorize(authorizations, HOSPITAL, beneficiary_id, MEDICAL, 1_000)
    assert again.decision == DECLINED
    refused(
        lambda: capture(authorizations, HOSPITAL, stale.authorization_id, 3_000),
        grpc.StatusCode.FAILED_PRECONDITION,
        "RELATIONSHIP_NOT_ACTIVE",
    )
    assert ledger(server, relationship_id).spent_fen == 0


def test_a_rolling_turn_follows_the_dissolutions_cursor_and_counts_what_it_mended(
    server: Harness, stubs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, relationships, authorizations, _ = stubs
    beneficiary_id, relationship_id = family_with_a_hold(registry, relationships, authorizations)
    dissolved_with_its_redis_step_lost(server, relationships, beneficiary_id, relationship_id)
    app = server.app
    client = server.admin()

    def dissolutions(clock: Any) -> rolling_reconcile.ReconcilePage:
        async def page(after: str, page_size: int) -> tuple[str, ReconcileReport]:
            return await reconcile_dissolved_page(app.database, app.quotas, after, page_size, clock)

        return page

    def turn(clock: Any) -> None:
        client.delete(keys.RECONCILE_TURN)
        server.run(
            rolling_reconcile.take_turn_and_reconcile(
                app.pipelined_redis, 1, rolling_page(server), dissolutions(clock)
            )
        )

    try:
        client.delete(keys.RECONCILE_DISSOLVED_CURSOR)
        # Not yet settled (a transaction dissolving with an earlier clock reading might still
        # commit): not read, the cursor stays before it.
        turn(lambda: datetime.now(UTC))
        stored = client.get(keys.RECONCILE_DISSOLVED_CURSOR)
        assert stored is None or not stored.decode().endswith("|" + relationship_id)
        assert client.hget(keys.quota(beneficiary_id, relationship_id), "status") == b"ACTIVE"

        monkeypatch.setattr(rolling_reconcile, "PAGE_SIZE", 1_000)
        drift_before = counted("medwallet_reconcile_drift_total")
        fen_before = counted("medwallet_reconcile_drift_fen_total")
        turn(settled_clock)
        stored = client.get(keys.RECONCILE_DISSOLVED_CURSOR)
        assert stored is not None and stored.decode().endswith("|" + relationship_id)
        assert client.hget(keys.quota(beneficiary_id, relationship_id), "status") == b"DISSOLVED"
        assert counted("medwallet_reconcile_drift_total") == drift_before + 1
        assert counted("medwallet_reconcile_drift_fen_total") == fen_before + 20_000

        # The next turn starts after it: nothing more to read, the cursor unchanged.
        turn(settled_clock)
        assert client.get(keys.RECONCILE_DISSOLVED_CURSOR) == stored
        assert counted("medwallet_reconcile_drift_total") == drift_before + 1
    finally:
        client.close()


def test_a_dissolution_redis_kept_is_passed_without_a_script(
    server: Harness, stubs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual case: the dissolve's own Redis step ran. The page reads the quota, finds it
    dissolved, and moves on without running quota_dissolve.lua again (a pass over the history
    after a lost cursor costs reads, not writes)."""
    registry, relationships, authorizations, _ = stubs
    _, relationship_id = family_with_a_hold(registry, relationships, authorizations)
    dissolve(relationships, relationship_id)
    app = server.app
    dissolved: list[str] = []
    real = app.quotas.dissolve

    async def counting(beneficiary: str, relationship: str) -> None:
        dissolved.append(relationship)
        await real(beneficiary, relationship)

    monkeypatch.setattr(app.quotas, "dissolve", counting)
    cursor, report = pages_until_past(server, relationship_id)
    assert cursor.endswith("|" + relationship_id)
    assert relationship_id not in dissolved
    assert report.failed == 0


def test_a_dissolution_is_made_sure_of_when_redis_stalls_under_load(
    server: Harness, stubs: Any
) -> None:
    """Redis stops taking writes (CLIENT PAUSE WRITE, longer than the service's Redis timeout)
    while a dissolutions page runs and payments go on: the page counts the dissolution failed
    and leaves the cursor before it; once Redis takes writes again the next page mends it. The
    payments' money stays right throughout."""
    registry, relationships, authorizations, _ = stubs
    beneficiary_id, relationship_id = family_with_a_hold(registry, relationships, authorizations)
    others = [family_with_a_hold(registry, relationships, authorizations) for _ in range(3)]
    dissolved_with_its_redis_step_lost(server, relationships, beneficiary_id, relationship_id)
    app = server.app
    stop = threading.Event()
    outcomes: list[int] = []

    def pay() -> None:
        while not stop.is_set():
            for other_beneficiary, _ in others:
                try:
                    outcomes.append(
                        authorize(authorizations, HOSPITAL, other_beneficiary, MEDICAL, 10).decision
                    )
                except Exception:  # UNAVAILABLE while Redis is paused
                    outcomes.append(-1)

    payer = threading.Thread(target=pay)
    payer.start()
    client = server.admin()
    try:
        cursor_before = _cursor_before(server, relationship_id)
        client.execute_command("CLIENT", "PAUSE", 3_000, "WRITE")
        try:
            moved_to, report = server.run(
                reconcile_dissolved_page(app.database, app.quotas, cursor_before, 1, settled_clock)
            )
        finally:
            client.execute_command("CLIENT", "UNPAUSE")
        assert report.failed == 1 and report.drifted == 0
        assert moved_to == cursor_before
        moved_to, report = server.run(
            reconcile_dissolved_page(app.database, app.quotas, cursor_before, 1, settled_clock)
        )
        # The paused page's dissolve may still run when Redis takes writes again (a command
        # Redis read before the client gave up on it): then this page finds it dissolved
        # already. Either way the cursor moves past it only now, with the quota dissolved.
        assert moved_to.endswith("|" + relationship_id) and report.drifted in (0, 1)
        assert client.hget(keys.quota(beneficiary_id, relationship_id), "status") == b"DISSOLVED"
    finally:
        stop.set()
        payer.join(30)
        client.close()
    assert APPROVED in outcomes
    for other_beneficiary, other_relationship in others:
        hot = server.run(app.quotas.figures(other_beneficiary, [other_relationship]))
        figures = hot[other_relationship]
        unused = ledger(server, other_relationship).unused_fen
        assert figures.available_fen + figures.held_fen == unused


def _cursor_before(harness: Harness, relationship_id: str) -> str:
    """The cursor of the dissolution just before `relationship_id`'s ("" if none)."""
    cursor = ""
    app = harness.app
    while True:
        moved_to, _ = harness.run(
            reconcile_dissolved_page(app.database, _ReadOnly(app.quotas), cursor, 1, settled_clock)
        )
        if moved_to == cursor or moved_to.endswith("|" + relationship_id):
            return cursor
        cursor = moved_to


class _ReadOnly:
    """A quota cache that reports every quota dissolved already: pages only move the cursor."""

    def __init__(self, real: Any) -> None:
        self.real = real

    async def still_active(
        self, beneficiary_id: str, relationship_ids: list[str]
    ) -> dict[str, Any]:
        return {}


@pytest.mark.parametrize("cursor", ["", "garbage", "not-a-date|rel-1"])
def test_a_missing_or_unreadable_cursor_starts_from_the_first_dissolution(cursor: str) -> None:
    assert parse_cursor(cursor) is None


def test_a_cursor_reads_back_as_it_was_written() -> None:
    moment = datetime(2026, 12, 5, 12, 0, 0, 123456, tzinfo=UTC)
    dissolution = reconcile_dissolved.Dissolution("rel-1", "ben-1", moment)
    assert parse_cursor(dissolution.cursor) == (moment, "rel-1")


def test_a_stale_quota_sharing_holds_with_another_quota_gives_the_other_its_part_back_once(
    server: Harness, stubs: Any
) -> None:
    """Holds funded from the stale quota and another: dissolving the stale one in Redis voids
    them and gives the other quota its part back, once."""
    registry, relationships, authorizations, _ = stubs
    register_merchants(registry)
    fam = family(registry, relationships, 20_000, 20_000)
    stale_id, other_id = fam.relationship_ids
    beneficiary_id = fam.beneficiary_id
    first = authorize(authorizations, HOSPITAL, beneficiary_id, MEDICAL, 10_000)
    both = authorize(authorizations, HOSPITAL, beneficiary_id, MEDICAL, 15_000)
    assert first.decision == APPROVED and both.decision == APPROVED
    dissolved_with_its_redis_step_lost(server, relationships, beneficiary_id, stale_id)
    void(authorizations, HOSPITAL, both.authorization_id)
    # The stale window: 20,000 from the dissolved quota and 5,000 from the other.
    spanning = authorize(authorizations, HOSPITAL, beneficiary_id, MEDICAL, 25_000)
    assert spanning.decision == APPROVED

    pages_until_past(server, stale_id)
    hot = server.run(server.app.quotas.figures(beneficiary_id, [stale_id, other_id]))
    assert (hot[stale_id].available_fen, hot[stale_id].held_fen) == (0, 0)
    assert (hot[other_id].available_fen, hot[other_id].held_fen) == (20_000, 0)
    assert ledger(server, other_id).unused_fen == 20_000
    voided = get(authorizations, HOSPITAL, spanning.authorization_id)
    assert voided.status == pb.AUTHORIZATION_STATUS_VOIDED
    again = authorize(authorizations, HOSPITAL, beneficiary_id, MEDICAL, 20_000)
    assert again.decision == APPROVED  # the other quota, whole


def slowed_dissolve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each dissolving transaction takes half a second on the SQL thread (a lock waited on)."""
    real = ledger_module.dissolve

    def slow(*arguments: Any, **named: Any) -> int:
        time.sleep(0.5)
        return real(*arguments, **named)

    monkeypatch.setattr(ledger_module, "dissolve", slow)


def hot_status(harness: Harness, beneficiary_id: str, relationship_id: str) -> bytes | None:
    client = harness.admin()
    try:
        status = client.hget(keys.quota(beneficiary_id, relationship_id), "status")
    finally:
        client.close()
    assert status is None or isinstance(status, bytes)
    return status


def test_a_dissolve_whose_caller_gave_up_still_dissolves_in_redis(
    server: Harness, stubs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's deadline passes while the dissolve's transaction is on the SQL thread: the
    transaction commits all the same, and so must its Redis step (not wait for the cursor)."""
    registry, relationships, authorizations, _ = stubs
    beneficiary_id, relationship_id = family_with_a_hold(registry, relationships, authorizations)
    slowed_dissolve(monkeypatch)
    app = server.app

    async def call_with_deadline() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                app.relationships.dissolve(relationship_id, Party.HOLDER, Channel.APP), 0.1
            )

    server.run(call_with_deadline())
    wait_for(lambda: ledger(server, relationship_id).unused_fen == 0, seconds=10)
    wait_for(lambda: hot_status(server, beneficiary_id, relationship_id) == b"DISSOLVED")


def test_an_insurance_event_whose_caller_gave_up_still_dissolves_in_redis(
    server: Harness, stubs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, for the relationships an insurance event (a death) dissolves."""
    registry, relationships, authorizations, _ = stubs
    beneficiary_id, relationship_id = family_with_a_hold(registry, relationships, authorizations)
    slowed_dissolve(monkeypatch)
    app = server.app
    event = InsuranceEvent(
        participant_id=beneficiary_id,
        event_type=InsuranceEventType.TERMINATED,
        termination_reason=TerminationReason.DEATH,
        new_pooling_region=None,
        new_scheme=None,
    )

    async def call_with_deadline() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(app.registry.report_event(event), 0.1)

    server.run(call_with_deadline())
    wait_for(lambda: ledger(server, relationship_id).unused_fen == 0, seconds=10)
    wait_for(lambda: hot_status(server, beneficiary_id, relationship_id) == b"DISSOLVED")


def test_a_rebuild_sets_the_dissolutions_cursor_at_its_start(server: Harness) -> None:
    """A rebuild deletes every mw:* key, the cursor with them; started over, the cursor would
    read every dissolution ever made before a lost Redis step after the rebuild is found. The
    rebuild sets it at its own start (less the grace) instead."""
    client = server.admin()
    try:
        client.set(keys.RECONCILE_DISSOLVED_CURSOR, "2020-01-01T00:00:00+00:00|old")
    finally:
        client.close()
    before = datetime.now(UTC)
    lose_redis(server)
    client = server.admin()
    try:
        stored = client.get(keys.RECONCILE_DISSOLVED_CURSOR)
    finally:
        client.close()
    assert isinstance(stored, bytes)
    position = parse_cursor(stored.decode())
    assert position is not None
    grace = timedelta(seconds=SETTLED_AFTER_SECONDS)
    assert before - grace - timedelta(seconds=5) <= position[0] <= datetime.now(UTC) - grace
