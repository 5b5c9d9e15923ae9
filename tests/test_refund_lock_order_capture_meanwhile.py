"""Two refunds of one authorization on two workers, its capture committed after one batch read
its refunds' capture parts (lock_first found none of it: its quotas not locked first). That
unit locks the quotas itself, in id order, before the capture row, as the other worker's batch
(its lock_first saw the parts) took them: both wait in one order. When the unit took the
capture row first and then its quotas, last-drawn first, the two took the capture row and the
quotas in opposite orders and deadlocked on PostgreSQL (an audit's test: one refund UNAVAILABLE).

X: this app's group commit; its lock_first runs, then the capture of A commits (stands for a
capture committing between lock_first's read and the unit), then X's unit pauses before the
high quota. Y: another worker's refund of A, with or without its batch's locks taken first.
PostgreSQL only (TEST_DATABASE_URL)."""

from __future__ import annotations

import asyncio
import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2
from authz_server.server import convert
from authz_server.server.authorization_handler import _encode_refund
from authz_server.service.idempotency import Idempotency
from authz_server.storage.sql import records
from authz_server.storage.sql.group_commit import GroupCommit
from authz_server.storage.sql.refund_locks import lock_refund_quotas
from tests.harness import Harness, new_id
from tests.pg_locks import waited_for_rows
from tests.test_authorization_rules import (
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    refund,
    register_merchants,
)
from tests.test_refund_lock_order import _calling, _funding, _two_quotas

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"), reason="a lock-order deadlock needs PostgreSQL"
)
MERCHANT = "rules-hospital"


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


@pytest.mark.parametrize("other_lock_first", ["without_locks_first", "with_locks_first"])
def test_two_refunds_of_a_just_captured_authorization_on_two_workers_do_not_deadlock(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    monkeypatch: Any,
    other_lock_first: str,
) -> None:
    app = harness.app
    loop = harness.loop
    beneficiary, low, high = _two_quotas(registry, relationships)
    held = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 12_000)
    assert _funding(held) == [(low, 10_000), (high, 2_000)]
    authorization_id = held.authorization_id

    # Worker X (this app): the capture commits after its batch's lock_first read the parts.
    x_batch = app.authorizations.group_commit
    real_lock_first = x_batch.lock_first
    assert real_lock_first is lock_refund_quotas
    armed = threading.Event()

    def capture_commits_meanwhile(session: Any, keys: list[str]) -> None:
        real_lock_first(session, keys)  # finds no parts of A: nothing of A locked
        if authorization_id in keys and not armed.is_set():
            capture(authorizations, HOSPITAL, authorization_id)  # committed now
            armed.set()

    monkeypatch.setattr(x_batch, "lock_first", capture_commits_meanwhile)

    asking, go = threading.Event(), threading.Event()
    real_row = records.relationship_row
    paused = [False]

    def pausing(session: Any, relationship_id: str, *, lock: bool = False) -> Any:
        if lock and relationship_id == high and armed.is_set() and not paused[0]:
            paused[0] = True  # X's unit: captures(A) locked, the high quota next
            asking.set()
            go.wait(20)
        return real_row(session, relationship_id, lock=lock)

    monkeypatch.setattr(records, "relationship_row", pausing)

    # Worker Y: the same service on a group commit of its own (with or without lock_first).
    y_commit = GroupCommit(
        app.database,
        lock_first=lock_refund_quotas if other_lock_first == "with_locks_first" else None,
    )

    async def start() -> None:
        y_commit.start()

    harness.run(start())
    y_worker = copy.copy(app.authorizations)
    y_worker.refunds = copy.copy(y_worker.refunds)
    y_worker.refunds.group_commit = y_commit
    request = authorization_pb2.RefundRequest(
        authorization_id=authorization_id, amount_fen=1_000, idempotency_key=new_id("refund")
    )
    call = Idempotency(
        f"refund:{MERCHANT}", request.idempotency_key, convert.digest(request), _encode_refund
    )

    try:
        with ThreadPoolExecutor(1) as pool:
            x = pool.submit(
                _calling, lambda: refund(authorizations, HOSPITAL, authorization_id, 5_000)
            )
            assert asking.wait(30), "X's refund never asked for the high quota"
            y = asyncio.run_coroutine_threadsafe(
                y_worker.refund(MERCHANT, authorization_id, 1_000, call), loop
            )
            waited = waited_for_rows(harness.database_url, "captures", "relationships")
            go.set()
            assert waited, "Y never waited for X"
            x_outcome = x.result(30)
            try:
                y.result(30)
                y_outcome = "OK"
            except Exception as error:
                y_outcome = f"{type(error).__name__}: {error}"
    finally:
        go.set()
        harness.run(y_commit.stop())
    assert (x_outcome, y_outcome) == ("OK", "OK")
