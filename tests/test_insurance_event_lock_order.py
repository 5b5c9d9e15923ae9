"""Two insurance events at once, on two relatives supported by the same two holders, take the
holders' account rows in one order. An event locks its person's relationships (id order), then
the person, then credits each relationship's holder with the unused quota (ledger.dissolve:
UPDATE participants) in relationship id order. Beneficiaries B and C, each supported by holders
H1 and H2, with B's relationship from H1 before H2's and C's from H2 before H1's (random ids:
it happens half the time): the events on B and C credit H1, H2 and H2, H1, and deadlocked on
PostgreSQL (one event answered UNAVAILABLE after deadlock_timeout: the dead or transferred
person's relationships left active, their quota still spendable, until an operator retries).
Now an event locks the people it will credit in id order before it dissolves anything.
PostgreSQL only (TEST_DATABASE_URL); SQLite has one writer at a time."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from authz_server.service import ledger
from tests import factories
from tests.harness import Harness
from tests.pg_locks import waited_for_rows
from tests.test_insurance_events import EVENTS, report
from tests.test_refund_lock_order import _calling
from tests.test_relationship_rules import dissolve

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"), reason="a lock-order deadlock needs PostgreSQL"
)


def crossed_families(registry: Any, relationships: Any) -> tuple[str, str]:
    """(B, C): B's relationship from H1 has a lower id than B's from H2; C's from H2 a lower
    id than C's from H1. Each holder keeps 10,000 in each quota."""
    h1, h2 = (factories.employee(registry, 1_000_000) for _ in range(2))
    b, c = factories.resident(registry), factories.resident(registry)
    b1 = factories.active_relationship(relationships, h1, b, 10_000)
    b2 = factories.active_relationship(relationships, h2, b, 10_000)
    if b1 > b2:
        h1, h2 = h2, h1
    for _ in range(40):
        c1 = factories.active_relationship(relationships, h1, c, 10_000)
        c2 = factories.active_relationship(relationships, h2, c, 10_000)
        if c2 < c1:
            return b, c
        dissolve(relationships, c1)
        dissolve(relationships, c2)
    raise AssertionError("no crossed ids in 40 tries")


def test_two_events_crediting_the_same_holders_do_not_deadlock(
    harness: Harness, registry: Any, relationships: Any, monkeypatch: Any
) -> None:
    b, c = crossed_families(registry, relationships)

    # The first event pauses once it has credited its first holder.
    holding, go = threading.Event(), threading.Event()
    real = ledger.credit_account
    armed = [False]

    def pausing(session: Any, holder_id: str, amount_fen: int) -> None:
        real(session, holder_id, amount_fen)
        if armed[0]:
            armed[0] = False
            holding.set()
            go.wait(15)

    monkeypatch.setattr(ledger, "credit_account", pausing)

    def event_on(person: str) -> str:
        return _calling(lambda: report(registry, person, **EVENTS["death"]))

    with ThreadPoolExecutor(2) as pool:
        armed[0] = True
        first = pool.submit(event_on, b)
        assert holding.wait(15), "the first event never credited a holder"
        second = pool.submit(event_on, c)
        waited = waited_for_rows(harness.database_url, "participants", seconds=5)
        go.set()
        outcomes = (first.result(30), second.result(30))
    assert waited, "the second event never waited for a person's row: no race to test"
    assert outcomes == ("OK", "OK")
