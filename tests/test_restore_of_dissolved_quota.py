"""A quota set from the ledger (quota_restore.lua) after SQL dissolved it, while its dissolve's
Redis step was lost: the restore marks it DISSOLVED but leaves its open holds PENDING, and the
rolling reconcile's dissolutions cursor (runtime/reconcile_dissolved.py) then skips it, as no
longer active in Redis. A hold split over it and another quota keeps the other quota's part
held for nobody until it expires (a day at a hospital): the capture of it is refused."""

from __future__ import annotations

from typing import Any

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.service.quota_sync import restore_from_ledger
from authz_server.storage.redis import keys
from tests.harness import Harness
from tests.test_authorization_rules import HOSPITAL, MEDICAL, authorize, family, register_merchants
from tests.test_reconcile_dissolved import dissolved_with_its_redis_step_lost


def test_a_restore_of_a_dissolved_quota_voids_its_holds(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 10_000, 10_000)
    r1, r2 = fam.relationship_ids
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 15_000)
    assert answer.decision == pb.DECISION_APPROVED and len(answer.funding) == 2, answer
    dissolved_with_its_redis_step_lost(harness, relationships, fam.beneficiary_id, r1)
    # A heal of that quota (an allocation's retry, a refund's replay, GetRelationship racing)
    harness.run(restore_from_ledger(harness.app.database, harness.app.quotas, r1))
    client = harness.admin()
    try:
        prefix = keys.prefix(fam.beneficiary_id)
        assert client.hget(keys.quota(fam.beneficiary_id, r1), "status") == b"DISSOLVED"
        status = client.hget(f"{prefix}:a:{answer.authorization_id}", "s")
        held = int(client.hget(keys.quota(fam.beneficiary_id, r2), "held") or 0)
    finally:
        client.close()
    assert (status, held) == (b"VOIDED", 0)
