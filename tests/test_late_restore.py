"""A restore of a quota from the ledger that reaches Redis late: read under the relationship's row
lock, sent, its reply timed out, the caller gave up and let the lock go, and only then did the
command itself run (a stalled network path, a Redis busy past the timeout). Before, it set the
quota from a ledger figure that no longer held: a capture finished meanwhile was counted back
(Redis let the family spend it again), a dissolved quota was made active again, a credit whose
Redis step had run was lost. Now each restore carries the quota's money version, read under the
same lock, and changes nothing once the quota's money moved (lua/quota_restore.lua). Found by a
helper's audit of reconcile's retries; each test here fails without the version."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from authz_server.domain.errors import Unavailable
from authz_server.generated.medwallet.v1 import relationship_pb2
from authz_server.runtime.reconcile import reconcile
from authz_server.service.quota_sync import locked_restore_of, restore_from_ledger
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import PipelinedRedis, as_integer
from authz_server.storage.redis.quota_cache import RedisQuotaCache
from authz_server.storage.redis.quota_io import QuotaRestoreCall, RestoreRefused
from authz_server.storage.redis.script_io import run
from authz_server.storage.redis.scripts import script
from authz_server.storage.sql.database import Database
from tests.harness import APP, Harness, new_id, own_harness
from tests.held_proxy import HeldProxy
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    dissolve,
    family,
    register_merchants,
)
from tests.test_insurance_events import allocate
from tests.test_live_reconcile import redis_agrees_with_sql
from tests.test_reconcile_drift import family_with_a_hold, overstated
from tests.test_redis_loss import served_stubs

MOVED = RestoreRefused.MOVED


def restore_read_now(harness: Harness, relationship_id: str) -> QuotaRestoreCall:
    """The restore a reconcile page prepares under the relationship's row lock: the ledger's
    figure and mark, and the quota's money version, read now (to be sent late)."""

    quota = harness.app.database.transaction(
        lambda session: locked_restore_of(session, relationship_id)
    )
    version = harness.run(
        harness.app.quotas.commands.execute(
            "HGET", keys.quota(quota.beneficiary_id, quota.relationship_id), "v"
        )
    )
    return QuotaRestoreCall(
        quota, os.urandom(8).hex(), 0 if version is None else as_integer(version)
    )


def arrives_now(harness: Harness, late: QuotaRestoreCall) -> Any:
    return harness.run(run(harness.app.quotas.commands, late))


def test_a_late_restore_does_not_count_back_a_capture_finished_since(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    late = restore_read_now(harness, relationship_id)  # unused 20,000, held 12,000
    answer = capture(authorizations, HOSPITAL, held.authorization_id, 12_000)
    assert answer.status == CAPTURED

    assert arrives_now(harness, late) is MOVED  # nothing done
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
    more = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    assert more.decision == DECLINED  # not the 12,000 counted back


def test_a_late_restore_does_not_make_a_dissolved_quota_active_again(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    late = restore_read_now(harness, relationship_id)
    assert dissolve(relationships, relationship_id) == 20_000

    assert arrives_now(harness, late) is MOVED
    quota = keys.quota(fam.beneficiary_id, relationship_id)
    status = harness.run(harness.app.quotas.commands.execute("HGET", quota, "status"))
    assert status == b"DISSOLVED"
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (0, 0)
    assert authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 100).decision == (
        DECLINED
    )


def test_a_late_restore_does_not_lose_a_credit_whose_redis_step_ran(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    late = restore_read_now(harness, relationship_id)
    allocate(relationships, relationship_id, 5_000)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (25_000, 0)

    assert arrives_now(harness, late) is MOVED  # not 20,000, the credit marked counted
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (25_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)


def test_a_late_restore_does_not_give_back_a_release(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    """The release's Redis debit moved the version: the 8,000 fen released to the holder's
    account are not put back in the quota (they would be spent twice)."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    late = restore_read_now(harness, relationship_id)
    relationships.ReleaseQuota(
        relationship_pb2.ReleaseQuotaRequest(
            relationship_id=relationship_id, amount_fen=8_000, idempotency_key=new_id("release")
        ),
        metadata=APP,
    )
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (12_000, 0)

    assert arrives_now(harness, late) is MOVED
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (12_000, 0)
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)


def test_a_late_restore_is_applied_when_no_money_moved_only_holds(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """Holds placed or voided move money between available and held, never in or out: the
    restore recounts held from the open holds, so it is still right, and it still repairs."""
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    late = restore_read_now(harness, relationship_id)
    authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 3_000)
    client = harness.admin()
    try:  # and Redis wrong meanwhile, as the reconcile found it
        client.hincrby(keys.quota(fam.beneficiary_id, relationship_id), "available", 7_400)
    finally:
        client.close()

    after = arrives_now(harness, late)
    assert (after.available_fen, after.held_fen) == (17_000, 3_000)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (17_000, 3_000)


# --- a restore refused while its caller still holds the lock is set again ------------------


def test_a_restore_is_set_when_a_step_of_an_earlier_commit_moves_the_money_under_the_lock(
    harness: Harness, registry: Any, relationships: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allocation committed in SQL; its Redis credit lands between the restore's read of
    the version and its write (both under the row lock the restore holds, which the credit does
    not need). The ledger counts the allocation: the restore reads the version again and sets
    the quota, rather than failing a repair (found by the audit)."""
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    quotas = harness.app.quotas
    real_credit = quotas.credit
    deferred: list[tuple[Any, ...]] = []

    async def credit_later(*arguments: Any) -> bool:
        deferred.append(arguments)
        return True

    monkeypatch.setattr(quotas, "credit", credit_later)
    allocate(relationships, relationship_id, 5_000)
    monkeypatch.setattr(quotas, "credit", real_credit)
    assert len(deferred) == 1 and hot_figures(harness, fam.beneficiary_id, relationship_id) == (
        20_000,
        0,
    )
    real_execute = quotas.commands.execute

    async def execute(*command: Any) -> Any:
        reply = await real_execute(*command)
        if command[0] == "HGET" and command[2] == "v" and deferred:
            await real_credit(*deferred.pop())  # the credit's Redis step lands now
        return reply

    monkeypatch.setattr(quotas.commands, "execute", execute)
    figures = harness.run(restore_from_ledger(harness.app.database, quotas, relationship_id))
    assert (figures.available_fen, figures.held_fen) == (25_000, 0)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (25_000, 0)


def test_a_retry_refused_by_its_own_first_try_landing_late_still_counts_the_drift(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reconcile's first try at a quota lost its reply and is still on its way; its retry reads
    the version, then the first try lands (repairing the overstatement): the retry sets the
    quota again instead of being left "busy", and the drift the first try repaired is counted
    (found by the audit: it was reported 0 drifted, 1 busy)."""
    beneficiary_id, relationship_id = family_with_a_hold(registry, relationships, authorizations)
    app = harness.app
    harness.run(reconcile(app.database, app.quotas, app.holds, harness.clock))  # others' repaired
    overstated(harness, beneficiary_id, relationship_id)
    quotas = app.quotas
    real_run, real_execute = quotas._run, quotas.commands.execute
    on_the_wire: list[Any] = []
    key = keys.quota(beneficiary_id, relationship_id)

    async def first_reply_lost(call: Any) -> Any:
        ours = isinstance(call, QuotaRestoreCall) and call.quota.relationship_id == relationship_id
        if ours and not on_the_wire:
            on_the_wire.append(call)  # sent; its reply will be lost
            raise Unavailable("the quota store did not answer: TimeoutError")
        return await real_run(call)

    async def execute(*command: Any) -> Any:
        reply = await real_execute(*command)
        if command[:3] == ("HGET", key, "v") and on_the_wire and on_the_wire[-1] is not None:
            await run(quotas.commands, on_the_wire[-1])  # the first try lands now
            on_the_wire.append(None)
        return reply

    monkeypatch.setattr(quotas, "_run", first_reply_lost)
    monkeypatch.setattr(quotas.commands, "execute", execute)
    report = harness.run(reconcile(app.database, quotas, app.holds, harness.clock))
    assert len(on_the_wire) == 2  # the first try was sent, and landed after the retry's read
    assert (report.drifted, report.drift_fen, report.overstated) == (1, 7_400, 1)
    assert hot_figures(harness, beneficiary_id, relationship_id) == (15_000, 5_000)


# --- the same end to end: a reconcile whose restores are held on the wire -------------------

FAMILIES = 12
QUOTA_FEN, HOLD_FEN = 20_000, 12_000


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A server of its own: its database holds only this test's quotas, so the reconcile's
    first page is theirs."""
    yield from own_harness(tmp_path_factory.mktemp("late-restore"))


@pytest.mark.single_redis  # the proxy stands in front of the one redis-server
def test_restores_held_on_the_wire_past_a_failed_reconcile_change_nothing_once_captured(
    own_server: Harness,
) -> None:
    """A reconcile (the operator's Job, on its own connections) whose quota restores the
    network holds back: each times out, is tried again, the page is tried again, the reconcile
    fails and lets its row locks go. The tills then capture every hold, concurrently. Then the
    held restores reach Redis. Each must change nothing: Redis still equals SQL, and no family
    can spend its captured money twice."""
    held = own_server
    stubs = served_stubs(held)
    registry, relationships, authorizations, _ = next(stubs)
    families = [family(registry, relationships, QUOTA_FEN) for _ in range(FAMILIES)]
    holds = [
        authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, HOLD_FEN)
        for fam in families
    ]
    assert {answer.decision for answer in holds} == {APPROVED}
    proxy = HeldProxy(held.redis_url, script("quota_restore").sha.encode())
    commands = PipelinedRedis.from_url(proxy.url, timeout_seconds=0.3)
    commands.generation = held.app.quotas.commands.generation
    other = Database(held.database_url)
    try:
        first = held.run(reconcile(other, RedisQuotaCache(commands), None, held.clock))
        assert (first.quotas, first.drifted) == (FAMILIES, 0)  # through the proxy, unheld
        proxy.holding = True
        with pytest.raises(Unavailable):
            held.run(reconcile(other, RedisQuotaCache(commands), None, held.clock))
        assert proxy.chunks_held > 0

        answers: list[Any] = []
        tills = [
            threading.Thread(
                target=lambda hold=hold: answers.append(
                    capture(authorizations, HOSPITAL, hold.authorization_id, HOLD_FEN)
                )
            )
            for hold in holds
        ]
        for till in tills:
            till.start()
        for till in tills:
            till.join(30)
        assert [answer.status for answer in answers] == [CAPTURED] * FAMILIES

        proxy.release()  # the held restores run in Redis now
    finally:
        held.run(commands.aclose())
        proxy.close()
        other.close()
    for fam in families:
        (relationship_id,) = fam.relationship_ids
        assert hot_figures(held, fam.beneficiary_id, relationship_id) == (QUOTA_FEN - HOLD_FEN, 0)
        redis_agrees_with_sql(held, fam.beneficiary_id, relationship_id)
        again = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, HOLD_FEN)
        assert again.decision == DECLINED
    stubs.close()
