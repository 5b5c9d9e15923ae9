"""Refund batches on two workers whose quotas are disjoint but whose holders cross: a refund on
a dissolved quota credits its holder's personal account (ledger.credit_account: UPDATE
participants), and a batch's units do that in the order they came (X: P1 then P2; Y: P2 then
P1). They deadlocked on the participants rows on PostgreSQL and one whole refund was answered
UNAVAILABLE (an audit's test). Now the batch's lock_first takes, after the quotas, the holders
of its quotas no longer active, in id order (storage/sql/refund_locks.py)."""

from __future__ import annotations

import asyncio
import copy
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2
from authz_server.server import convert
from authz_server.server.authorization_handler import _encode_refund
from authz_server.service.idempotency import Idempotency
from authz_server.storage.sql.group_commit import GroupCommit
from authz_server.storage.sql.refund_locks import lock_refund_quotas
from tests import factories
from tests.harness import Harness, new_id
from tests.pg_locks import waiting_for_rows
from tests.test_authorization_rules import (
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    dissolve,
    refund,
    register_merchants,
)

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"), reason="a lock-order deadlock needs PostgreSQL"
)
MERCHANT = "rules-hospital"


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


def _paired(
    commit: GroupCommit,
    arrived_once: threading.Event,
    first_ran: threading.Event,
    go: threading.Event,
) -> Any:
    """A submit putting the next two units into one batch, the first of them pausing after it
    ran (its holder's row updated, not committed) until `go`."""
    real_submit = commit.submit
    arrived: list[tuple[Any, dict[str, Any]]] = []
    both = asyncio.Event()
    submitted: list[asyncio.Future[Any]] = []

    async def together(work: Any, **options: Any) -> Any:
        place = len(arrived)
        if place == 0:

            def pausing(session: Any, work: Any = work) -> Any:
                answer = work(session)
                first_ran.set()
                go.wait(20)
                return answer

            arrived.append((pausing, options))
            arrived_once.set()
        else:
            arrived.append((work, options))
        if len(arrived) == 2:
            submitted.extend(asyncio.ensure_future(real_submit(w, **o)) for w, o in arrived)
            both.set()
        await both.wait()
        return await submitted[place]

    return together


def test_two_workers_refunding_to_crossed_holders_accounts_do_not_deadlock(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, monkeypatch: Any
) -> None:
    app = harness.app
    loop = harness.loop
    p1, p2 = (factories.employee(registry, balance_fen=50_000) for _ in range(2))
    b1, b2 = (factories.resident(registry) for _ in range(2))
    quotas = {
        (holder, beneficiary): factories.active_relationship(
            relationships, holder, beneficiary, 10_000
        )
        for holder in (p1, p2)
        for beneficiary in (b1, b2)
    }
    paid = {}
    for (holder, beneficiary), quota in quotas.items():
        answer = authorize(
            authorizations, HOSPITAL, beneficiary, MEDICAL, 1_000, relationship_id=quota
        )
        capture(authorizations, HOSPITAL, answer.authorization_id)
        paid[(holder, beneficiary)] = answer.authorization_id
    for quota in quotas.values():
        dissolve(relationships, quota)  # a refund now goes to the holder's account

    x_first, y_first, go = threading.Event(), threading.Event(), threading.Event()
    x_arrived, y_arrived = threading.Event(), threading.Event()
    monkeypatch.setattr(
        app.authorizations.group_commit,
        "submit",
        _paired(app.authorizations.group_commit, x_arrived, x_first, go),
    )
    y_commit = GroupCommit(app.database, lock_first=lock_refund_quotas)
    y_commit.submit = _paired(y_commit, y_arrived, y_first, go)  # type: ignore[method-assign]

    async def start() -> None:
        y_commit.start()

    harness.run(start())
    y_worker = copy.copy(app.authorizations)
    y_worker.refunds = copy.copy(y_worker.refunds)
    y_worker.refunds.group_commit = y_commit

    def x_refund(authorization_id: str) -> str:
        try:
            refund(authorizations, HOSPITAL, authorization_id, 1_000)
            return "OK"
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"

    def y_refund(authorization_id: str) -> Any:
        request = authorization_pb2.RefundRequest(
            authorization_id=authorization_id, amount_fen=1_000, idempotency_key=new_id("r")
        )
        call = Idempotency(
            f"refund:{MERCHANT}", request.idempotency_key, convert.digest(request), _encode_refund
        )
        return asyncio.run_coroutine_threadsafe(
            y_worker.refund(MERCHANT, authorization_id, 1_000, call), loop
        )

    def y_outcome(future: Any) -> str:
        try:
            future.result(30)
            return "OK"
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    try:
        with ThreadPoolExecutor(2) as pool:
            # X: P1's account, then P2's (b1's quotas); Y: P2's, then P1's (b2's quotas)
            x1 = pool.submit(x_refund, paid[(p1, b1)])
            assert x_arrived.wait(20)
            x2 = pool.submit(x_refund, paid[(p2, b1)])
            assert x_first.wait(20), "X's first refund never ran"
            y1 = y_refund(paid[(p2, b2)])
            assert y_arrived.wait(20)
            y2 = y_refund(paid[(p1, b2)])
            # Y's first refund runs (before a fix), or Y's batch waits for X's (with one)
            deadline = time.monotonic() + 20
            while not (y_first.is_set() or waiting_for_rows(harness.database_url)):
                assert time.monotonic() < deadline, "Y neither ran nor waited"
                time.sleep(0.05)
            go.set()
            outcomes = [x1.result(30), x2.result(30), y_outcome(y1), y_outcome(y2)]
    finally:
        go.set()
        harness.run(y_commit.stop())
    assert outcomes == ["OK"] * 4
    assert factories.balance(registry, p1) == factories.balance(registry, p2)
