"""Reconcile runs while servers serve (a new server's start during a rolling restart, the
reconcile Job, after a bulk load). It read a page of quotas from SQL, then set them in Redis
later: a capture or release committed in between, or a credit whose Redis step came after, left
Redis above SQL, and the family could spend money twice. Now each page is read under its row
locks and restored before they are let go, a credit counted by a restore is not added again
(its ledger entry is at or below the restore's mark), a debit's give-back after a restore is
dropped (the restore's epoch moved on), and a quota with a capture between its phases is left
alone. Found by an audit; the first two tests fail on the old code."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

from authz_server.generated.medwallet.v1 import relationship_pb2
from authz_server.runtime.reconcile import reconcile
from authz_server.service.ports import QuotaRestore
from authz_server.storage.sql.database import Database
from tests.harness import APP, Harness, new_id
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import (
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    register_merchants,
)


def run_reconcile(harness: Harness, quotas: Any) -> Any:
    """The operator's reconcile: its own SQL connections, the server's Redis."""
    other = Database(harness.database_url)
    try:
        return harness.run(reconcile(other, quotas, harness.app.holds, harness.clock))
    finally:
        other.close()


def redis_agrees_with_sql(harness: Harness, beneficiary_id: str, relationship_id: str) -> None:
    unused = ledger(harness, relationship_id).unused_fen
    assert sum(hot_figures(harness, beneficiary_id, relationship_id)) == unused


class SlowRestore:
    """The reconcile's quota cache: the restore of one quota takes a while."""

    def __init__(self, real: Any, relationship_id: str) -> None:
        self.real = real
        self.relationship_id = relationship_id
        self.reached = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def restore(self, quota: QuotaRestore) -> Any:
        if quota.relationship_id == self.relationship_id:
            self.reached.set()
            await asyncio.sleep(0.8)  # a capture of this quota tries to commit meanwhile
        return await self.real.restore(quota)


def test_a_capture_committing_while_its_quota_is_restored_is_not_counted_back(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    slow = SlowRestore(harness.app.quotas, relationship_id)
    answers: list[Any] = []

    def till() -> None:
        assert slow.reached.wait(30)
        answers.append(capture(authorizations, HOSPITAL, held.authorization_id, 12_000))

    thread = threading.Thread(target=till)
    thread.start()
    run_reconcile(harness, slow)
    thread.join(30)
    assert [(a.status, a.captured_amount_fen) for a in answers] == [(CAPTURED, 12_000)]
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)


class LateCredits:
    """The relationship service's quota cache: a credit's Redis step waits until `go`."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.committed = threading.Event()
        self.go = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def credit(self, *arguments: Any) -> bool:
        self.committed.set()  # SQL has the allocation
        await asyncio.get_running_loop().run_in_executor(None, self.go.wait, 30)
        return bool(await self.real.credit(*arguments))


def test_a_credit_whose_redis_step_comes_after_a_restore_is_not_added_twice(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    service = harness.app.relationships
    late = LateCredits(service.quotas)
    service.quotas = late
    allocated: list[Any] = []

    def window() -> None:
        request = relationship_pb2.AllocateQuotaRequest(
            relationship_id=relationship_id, amount_fen=5_000, idempotency_key=new_id("allocate")
        )
        allocated.append(relationships.AllocateQuota(request, metadata=APP))

    thread = threading.Thread(target=window)
    try:
        thread.start()
        assert late.committed.wait(30)
        run_reconcile(harness, harness.app.quotas)  # counts the 5,000 from SQL
        late.go.set()  # ... and then the allocation's own Redis step arrives
        thread.join(30)
    finally:
        service.quotas = late.real
    assert len(allocated) == 1
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (25_000, 0)


def test_credits_and_give_backs_already_counted_by_a_restore_are_dropped(
    harness: Harness,
) -> None:
    """The marks, on the quota cache alone: a credit at or below the restore's ledger mark and
    a give-back of a debit taken before the restore change nothing; later ones do."""
    quotas = harness.app.quotas
    beneficiary_id, relationship_id = f"b-{uuid.uuid4().hex}", f"r-{uuid.uuid4().hex}"

    def restore(unused_fen: int, mark: int) -> Any:
        quota = QuotaRestore(
            relationship_id, beneficiary_id, "holder", True, unused_fen, 1, "EMPLOYEE", mark
        )
        return harness.run(quotas.restore(quota))

    def available() -> int:
        return int(hot_figures(harness, beneficiary_id, relationship_id)[0])

    restore(10_000, mark=100)
    assert harness.run(quotas.credit(beneficiary_id, relationship_id, 500, 100))  # counted
    assert available() == 10_000
    assert harness.run(quotas.credit(beneficiary_id, relationship_id, 500, 101))
    assert available() == 10_500
    taken = harness.run(quotas.debit(beneficiary_id, relationship_id, 2_000))
    assert taken is not None and taken.available_fen == 8_500
    restore(10_500, mark=101)  # SQL never had the debit: the restore gives it back itself
    harness.run(quotas.give_back(beneficiary_id, relationship_id, 2_000, taken.epoch))
    assert available() == 10_500
    taken = harness.run(quotas.debit(beneficiary_id, relationship_id, 2_000))
    assert taken is not None
    harness.run(quotas.give_back(beneficiary_id, relationship_id, 2_000, taken.epoch))
    assert available() == 10_500


def test_a_quota_with_a_capture_between_its_phases_is_left_alone(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    now_ms = int(harness.clock().timestamp() * 1000)
    claimed = harness.run(
        harness.app.holds.capture_begin(
            held.authorization_id, "rules-hospital", new_id("c"), 0, now_ms
        )
    )
    assert claimed.outcome == "OK"
    quota = QuotaRestore(
        relationship_id, fam.beneficiary_id, "holder", True, 1, 1, "RESIDENT", 10**12
    )
    assert harness.run(harness.app.quotas.restore(quota)) is None  # BUSY: nothing changed
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
    report = run_reconcile(harness, harness.app.quotas)
    assert report.busy >= 1
    # the claim is live (younger than STALE_CAPTURE_SECONDS): reconcile left it as it was
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
