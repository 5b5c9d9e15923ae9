"""A consent and a proposal of the reverse pair take the two people's rows in one order.
A proposal locks both people in id order; a consent locked the relationship's holder first,
then its beneficiary: a consent of (holder Q, beneficiary P) and a proposal of (P, Q), with
P < Q, took the two rows in opposite orders and deadlocked on PostgreSQL (one of them
UNAVAILABLE after deadlock_timeout). Now a consent locks them in id order too. PostgreSQL only
(TEST_DATABASE_URL); SQLite has one writer at a time."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from authz_server.generated.medwallet.v1 import common_pb2, relationship_pb2
from authz_server.storage.sql import records
from tests import factories
from tests.harness import APP, Harness
from tests.pg_locks import waited_for_rows
from tests.test_refund_lock_order import _calling

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"), reason="a lock-order deadlock needs PostgreSQL"
)


def test_a_consent_and_a_proposal_of_the_reverse_pair_do_not_deadlock(
    harness: Harness, registry: Any, relationships: Any, monkeypatch: Any
) -> None:
    low, high = sorted(factories.employee(registry) for _ in range(2))
    proposed = relationships.ProposeRelationship(
        relationship_pb2.ProposeRelationshipRequest(
            holder_id=high, beneficiary_id=low, relation=common_pb2.RELATION_SPOUSE
        ),
        metadata=APP,
    )
    relationship_id = proposed.relationship.relationship_id

    # The consent pauses once it holds its first person's row.
    holding, go = threading.Event(), threading.Event()
    real = records.participant_row
    armed = [False]

    def pausing(session: Any, participant_id: str, *, lock: bool = False) -> Any:
        row = real(session, participant_id, lock=lock)
        if lock and armed[0]:
            armed[0] = False
            holding.set()
            go.wait(15)
        return row

    monkeypatch.setattr(records, "participant_row", pausing)

    def consenting() -> str:
        armed[0] = True
        request = relationship_pb2.ConsentRelationshipRequest(
            relationship_id=relationship_id, party=common_pb2.PARTY_HOLDER
        )
        return _calling(lambda: relationships.ConsentRelationship(request, metadata=APP))

    def proposing() -> str:
        request = relationship_pb2.ProposeRelationshipRequest(
            holder_id=low, beneficiary_id=high, relation=common_pb2.RELATION_SPOUSE
        )
        return _calling(lambda: relationships.ProposeRelationship(request, metadata=APP))

    with ThreadPoolExecutor(2) as pool:
        consented = pool.submit(consenting)
        assert holding.wait(15), "the consent never locked a person"
        proposal = pool.submit(proposing)  # locks the lower id first
        waited = waited_for_rows(harness.database_url, "participants")
        go.set()  # the consent goes on to its second person
        assert waited, "the proposal never waited for the consent's row: no race to test"
        outcomes = (consented.result(30), proposal.result(30))
    assert outcomes == ("OK", "OK")
