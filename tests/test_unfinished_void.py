"""A Void commits in SQL first, then voids the hold in Redis. A call cancelled while its SQL
transaction runs (the till's deadline passed) left the transaction to commit and skipped the
Redis step: the hold's money stayed held in Redis until the hold expired (up to a day for a
medical hold), declining the family's payments meanwhile, and no reconcile frees it (the hold
is open in Redis, and a restore keeps open holds). The void now runs to its end."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.service import authorization as authorization_module
from tests.harness import Harness
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    authorize,
    family,
    get,
    register_merchants,
    wait_for,
)


def test_a_void_committed_after_its_deadline_frees_the_hold_in_redis(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    assert held.decision == APPROVED
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
    real = authorization_module.void_in_ledger

    def slow(*arguments: Any, **named: Any) -> Any:  # on the SQL thread: a lock waited on
        time.sleep(1.0)
        return real(*arguments, **named)

    monkeypatch.setattr(authorization_module, "void_in_ledger", slow)
    with pytest.raises(grpc.RpcError) as gave_up:
        authorizations.Void(
            pb.VoidRequest(authorization_id=held.authorization_id), metadata=HOSPITAL, timeout=0.3
        )
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The transaction commits meanwhile; its Redis step follows it.
    wait_for(lambda: hot_figures(harness, fam.beneficiary_id, relationship_id) == (20_000, 0))
    harness.run(harness.app.authorizations.to_the_end.finished())
    assert ledger(harness, relationship_id).unused_fen == 20_000
    assert get(authorizations, HOSPITAL, held.authorization_id).status == (
        pb.AUTHORIZATION_STATUS_VOIDED
    )
    # The family can pay with the money at once, not after the hold's expiry.
    assert authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 20_000).decision == (
        APPROVED
    )
