"""Redis lost under load (issue 12): killed with -9 and restarted empty, FLUSHALL, and stalled
(the process stopped for 2 s, as DEBUG SLEEP would), each while 16 callers authorize, capture
and retry across 50 families.

In each case, and with no command typed:
- no business decline is caused by the fault (every family has far more quota than the run can
  spend, so any decline is the fault's);
- no approval is lost: every hold approved before the fault is capturable after it;
- no retried key gets a new decision (retries of captured and of approved payments, during and
  after the rebuild, with the family's relationship read in between);
- SQL never holds more captured than allocated;
- every figure of every quota is the same in Redis and in SQL at the end;
- the server serves again by itself. The counts and the recovery time are printed.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select

from authz_server.domain.hot_state import expected_figures
from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.generated.medwallet.v1 import (
    authorization_pb2_grpc,
    registry_pb2_grpc,
    relationship_pb2,
    relationship_pb2_grpc,
)
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.storage.sql.open_holds import open_holds
from authz_server.storage.sql.records import totals
from authz_server.storage.sql.tables import RelationshipRow
from tests import factories
from tests.harness import APP, Harness, bearer, new_id, own_harness
from tests.test_authorization_rules import MEDICAL, register_merchants

HOSPITAL = bearer("test-rules-hospital")
CALLERS = 16
FAMILIES = 50
QUOTA_FEN = 5_000_000  # far more than a run can spend: any decline is the fault's
# Seconds of load before the fault (the load goes on through the fault and after it), and once
# the server serves again: 16 callers make some thousands of calls in that time, holds open
# and captured on every side of the fault. (4 s and 6 s until 2026-12-06: the fault runs, ~16
# of them in CI, spent most of their time in these waits.)
LOAD_SECONDS = 2.0
AFTER_SECONDS = 3.0
RECOVERY_LIMIT_SECONDS = 60.0
# The work each fault test's load must have done, however slow the machine (work_done).
MINIMUM_APPROVED = 101
MINIMUM_RETRIES = 11
WORK_LIMIT_SECONDS = 120.0
# A call is given up after this many UNAVAILABLE answers in a row (each retried after a pause):
# 45 s. A capture whose claim reached Redis during a stall while its caller timed out waits for
# STALE_CAPTURE_SECONDS (30 s) before a retry with its key settles it.
ATTEMPTS = 900
PAUSE_SECONDS = 0.05


@pytest.fixture(scope="module")
def lossy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A server with a Redis of its own, to kill (the session's harness is shared)."""
    yield from own_harness(tmp_path_factory.mktemp("redis-loss"))


def served_stubs(harness: Harness) -> Iterator[Any]:
    """(registry, relationships, authorizations, health) stubs on one channel to `harness`, the
    rules' merchants registered (shared by the other fault tests' fixtures)."""
    channel = grpc.insecure_channel(harness.address)
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    register_merchants(registry)
    yield (
        registry,
        relationship_pb2_grpc.RelationshipServiceStub(channel),
        authorization_pb2_grpc.AuthorizationServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )
    channel.close()


@pytest.fixture(scope="module")
def stubs(lossy: Harness) -> Iterator[Any]:
    yield from served_stubs(lossy)


@pytest.fixture(scope="module")
def families(stubs: Any) -> list[tuple[str, str]]:
    return make_families(stubs)


def make_families(stubs: Any) -> list[tuple[str, str]]:
    """FAMILIES (beneficiary, relationship) pairs, one quota of QUOTA_FEN each."""
    registry, relationships, _, _ = stubs
    made = []
    for _ in range(FAMILIES):
        beneficiary = factories.resident(registry)
        holder = factories.employee(registry, balance_fen=QUOTA_FEN)
        made.append(
            (
                beneficiary,
                factories.active_relationship(relationships, holder, beneficiary, QUOTA_FEN),
            )
        )
    return made


@dataclass
class Tally:
    """What the callers saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    approved: int = 0
    captured: int = 0
    declines: list[str] = field(default_factory=list)
    unavailable: int = 0
    errors: list[str] = field(default_factory=list)
    # key -> (request, the authorization id first answered, captured?)
    answered: dict[str, tuple[pb.AuthorizeRequest, str]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # approved, never captured
    new_decisions_for_retries: list[str] = field(default_factory=list)
    retries: int = 0
    # per kind of call (authorize, capture, retry, read): when it last answered UNAVAILABLE
    last_unavailable: dict[str, float] = field(default_factory=dict)


def patiently(call: Callable[[], Any], tally: Tally, kind: str) -> Any:
    """The till's way: UNAVAILABLE (and a deadline) is retried with the same request."""
    for _ in range(ATTEMPTS):
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            with tally.lock:
                tally.unavailable += 1
                tally.last_unavailable[kind] = time.monotonic()
            time.sleep(PAUSE_SECONDS)
    raise AssertionError("still UNAVAILABLE after every attempt")


def caller(
    number: int,
    stubs: Any,
    families: list[tuple[str, str]],
    tally: Tally,
    stop: threading.Event,
) -> None:
    _, relationships, authorizations, _ = stubs
    chance = random.Random(number)
    while not stop.is_set():
        beneficiary, relationship_id = chance.choice(families)
        try:
            if tally.answered and chance.random() < 0.2:
                retry(chance, relationships, authorizations, tally, relationship_id)
                continue
            request = pb.AuthorizeRequest(
                idempotency_key=new_id("loss"),
                beneficiary_id=beneficiary,
                purpose=MEDICAL,  # type: ignore[arg-type]
                amount_fen=chance.randrange(100, 5_000),
            )
            answer = patiently(
                lambda request=request: authorizations.Authorize(
                    request, metadata=HOSPITAL, timeout=5
                ),
                tally,
                "authorize",
            )
            if answer.decision == pb.DECISION_DECLINED:
                with tally.lock:
                    tally.declines.append(pb.DeclineReason.Name(answer.decline_reason))
                continue
            with tally.lock:
                tally.approved += 1
                tally.answered[request.idempotency_key] = (request, answer.authorization_id)
            if chance.random() < 0.5:
                with tally.lock:
                    tally.pending.append(answer.authorization_id)
                continue
            capture(authorizations, tally, answer.authorization_id)
        except Exception as error:  # every surprise is counted and reported
            with tally.lock:
                tally.errors.append(repr(error))


def capture(authorizations: Any, tally: Tally, authorization_id: str) -> pb.Authorization:
    request = pb.CaptureRequest(authorization_id=authorization_id, idempotency_key=new_id("cap"))
    answer = patiently(
        lambda: authorizations.Capture(request, metadata=HOSPITAL, timeout=5), tally, "capture"
    )
    with tally.lock:
        tally.captured += 1
    return answer.authorization


def retry(
    chance: random.Random,
    relationships: Any,
    authorizations: Any,
    tally: Tally,
    relationship_id: str,
) -> None:
    """A till retries a payment it was answered before (captured or not), after the family's
    app read its relationship (which once put a quota back from SQL mid-loss)."""
    with tally.lock:
        key = chance.choice(list(tally.answered))
        request, first_id = tally.answered[key]
    patiently(
        lambda: relationships.GetRelationship(
            relationship_pb2.GetRelationshipRequest(relationship_id=relationship_id),
            metadata=APP,
            timeout=5,
        ),
        tally,
        "read",
    )
    answer = patiently(
        lambda: authorizations.Authorize(request, metadata=HOSPITAL, timeout=5), tally, "retry"
    )
    with tally.lock:
        tally.retries += 1
        if answer.authorization_id != first_id:
            tally.new_decisions_for_retries.append(key)


def serving(health: Any) -> bool:
    try:
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError:
        return False
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


def run_with_fault(
    lossy: Harness, stubs: Any, families: list[tuple[str, str]], fault: Callable[[], None]
) -> tuple[Tally, list[str], dict[str, float]]:
    """Load, the fault, load until the server serves again and a while after. Returns the
    tally, the holds approved before the fault and left open, and the recovery time."""
    tally, stop = Tally(), threading.Event()
    threads = [
        threading.Thread(target=caller, args=(number, stubs, families, tally, stop))
        for number in range(CALLERS)
    ]
    for thread in threads:
        thread.start()
    time.sleep(LOAD_SECONDS)
    # On a loaded machine the load's pace varies: the fault strikes once it has work in flight.
    work_done(tally, approved=50, retries=0)
    with tally.lock:
        before_fault = list(tally.pending)
    struck = time.monotonic()
    fault()
    health = stubs[3]
    deadline = struck + RECOVERY_LIMIT_SECONDS
    time.sleep(0.2)
    while not serving(health):
        assert time.monotonic() < deadline, "the server did not serve again by itself"
        time.sleep(0.05)
    time.sleep(AFTER_SECONDS)
    work_done(tally, approved=MINIMUM_APPROVED, retries=MINIMUM_RETRIES)
    stop.set()
    for thread in threads:
        thread.join(30)
    # Recovery: from the fault to the last UNAVAILABLE each kind of call saw (a capture caught
    # in a stall waits longer, see ATTEMPTS).
    recovery = {
        kind: round(max(0.0, moment - struck), 2) for kind, moment in tally.last_unavailable.items()
    }
    return tally, before_fault, recovery


def work_done(tally: Tally, approved: int, retries: int) -> None:
    """Waits (up to WORK_LIMIT_SECONDS) until the load has done this much: a count, not a time,
    so that a slow machine runs the same test rather than a smaller one."""
    deadline = time.monotonic() + WORK_LIMIT_SECONDS
    while tally.approved < approved or tally.retries < retries:
        assert time.monotonic() < deadline, (tally.approved, tally.retries)
        time.sleep(0.05)


def check(
    lossy: Harness,
    stubs: Any,
    name: str,
    tally: Tally,
    before: list[str],
    recovery: dict[str, float],
) -> None:
    _, _, authorizations, _ = stubs
    # Every hold approved before the fault is capturable after it.
    lost = []
    for authorization_id in before:
        try:
            capture(authorizations, tally, authorization_id)
        except grpc.RpcError as error:
            lost.append(f"{authorization_id}: {error.code()} {error.details()}")
    print(
        f"\n{name}: {tally.approved} approved, {tally.captured} captured, {tally.retries} retries,"
        f" {tally.unavailable} UNAVAILABLE answers, {len(tally.declines)} declines,"
        f" {len(lost)} of {len(before)} holds approved before the fault lost,"
        f" {len(tally.new_decisions_for_retries)} new decisions for retried keys,"
        f" last UNAVAILABLE (s after the fault, by call) {recovery}"
    )
    assert not tally.errors, tally.errors[:5]
    assert not tally.declines, tally.declines[:5]
    assert not lost, lost[:5]
    assert not tally.new_decisions_for_retries, tally.new_decisions_for_retries[:5]
    # the load did run (work_done waited for it)
    assert tally.approved >= MINIMUM_APPROVED and tally.retries >= MINIMUM_RETRIES
    assert_ledger_within_quota(lossy)
    assert_redis_equals_sql(lossy)


def assert_ledger_within_quota(lossy: Harness) -> None:
    rows = lossy.app.database.transaction(
        lambda session: list(session.scalars(select(RelationshipRow)))
    )
    over = [
        row.relationship_id
        for row in rows
        if row.captured_total_fen - row.refunded_to_quota_total_fen + row.released_total_fen
        > row.allocated_total_fen
    ]
    assert not over


def assert_redis_equals_sql(lossy: Harness) -> None:
    """Every active quota's (available, held) in Redis is what SQL's ledger and open holds say."""
    app = lossy.app

    def read(session: Any) -> tuple[dict[str, int], dict[str, str], list[Any]]:
        rows = list(
            session.scalars(select(RelationshipRow).where(RelationshipRow.status == "ACTIVE"))
        )
        unused = {row.relationship_id: totals(row).unused_fen for row in rows}
        owners = {row.relationship_id: row.beneficiary_id for row in rows}
        holds = open_holds(session, lossy.clock(), beneficiary_ids=sorted(set(owners.values())))
        return unused, owners, holds

    unused, owners, holds = app.database.transaction(read)
    expected = expected_figures(unused, holds)
    different = []
    for relationship_id, figures in expected.items():
        shown = lossy.run(app.quotas.figures(owners[relationship_id], [relationship_id]))
        if shown.get(relationship_id) != figures:
            different.append((relationship_id, shown.get(relationship_id), figures))
    assert not different, different[:5]


def test_redis_killed_and_restarted_empty(lossy: Harness, stubs: Any, families: Any) -> None:
    directory = Path(lossy.redis.directory)

    def kill_and_restart() -> None:
        process = lossy.redis.process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        time.sleep(0.5)
        lossy.redis = EmbeddedRedis(directory, persistent=False)
        lossy.redis.start()

    tally, before, recovery = run_with_fault(lossy, stubs, families, kill_and_restart)
    check(lossy, stubs, "kill -9, restarted empty", tally, before, recovery)
    assert lossy.app.guardian.last_rebuild is not None


def test_redis_flushed(lossy: Harness, stubs: Any, families: Any) -> None:
    rebuilt_before = lossy.app.guardian.last_rebuild

    def flush() -> None:
        lossy.run(lossy.client.flushall())

    tally, before, recovery = run_with_fault(lossy, stubs, families, flush)
    check(lossy, stubs, "FLUSHALL", tally, before, recovery)
    assert lossy.app.guardian.last_rebuild is not rebuilt_before
