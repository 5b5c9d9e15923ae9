"""A quota over-committed by its holds: a hold put back on money Redis approved twice after a
stale copy (hold_restore.lua) leaves the holds above the ledger's unused and available below
zero, and the reconcile's restore keeps it so until they are released (a medical hold: up to
24 h; quota_restore.lua capped held at unused once, and later releases gave back more than the
cap kept). Found by the audit of that change, each test failing before its fix:
- authorize.lua added every candidate quota's available into what the quotas can fund, the
  negative one too: the beneficiary's other quotas declined (or partially approved less than)
  money SQL has and nobody holds, and remaining_quota_fen came out short or below zero;
- quota_credit.lua answered the new available figure, or -1 for a missing quota: a credit
  landing on -1 was taken for a missing quota, and an allocation SQL committed and Redis
  credited was answered UNAVAILABLE (its restore BUSY beside a capture);
- the dissolutions cursor counted abs(available) + abs(held) as drift: 14,000 fen for
  (-2,000, 12,000), where the ledger gave the holder back 10,000;
- (a second audit) the relationship RPCs showed Redis's figures as they are: available_fen
  below zero and more held than the quota (GetRelationship, ListRelationships, the
  AllocateQuota answer), and a refused ReleaseQuota said "only -2000 fen ... available";
  now nothing free and all the unused money held (QuotaView.shown)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from authz_server.generated.medwallet.v1 import relationship_pb2
from authz_server.runtime.reconcile_dissolved import reconcile_dissolved_page
from authz_server.service.ports import CaptureOutcome
from authz_server.storage.redis import keys
from tests import engine_factories as ef
from tests import factories
from tests.harness import APP, Harness, new_id, own_harness
from tests.test_authorization_recovery import hot_figures, journaled, ledger
from tests.test_authorization_rules import (
    APPROVED,
    HOSPITAL,
    MEDICAL,
    PARTIAL,
    PHARMACY,
    PHARMACY_PURPOSE,
    authorize,
    family,
    funding,
    get,
    line,
    register_merchants,
)
from tests.test_reconcile_dissolved import (
    _cursor_before,
    dissolved_with_its_redis_step_lost,
    settled_clock,
)
from tests.test_reconcile_lost_holds import reconcile_family, serve_stale_copy, snapshot_slot
from tests.test_redis_loss import served_stubs


def _over_commit_first(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, *others: int
) -> tuple[str, list[str]]:
    """The oldest quota (10,000) approved twice after a stale copy (4,000 put back + 8,000),
    the beneficiary's other quotas untouched; then the next reconcile pass."""
    register_merchants(registry)
    fam = family(registry, relationships, 10_000, *others)
    beneficiary, rids = fam.beneficiary_id, fam.relationship_ids
    copy = snapshot_slot(harness, beneficiary)
    lost = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 4_000)
    assert lost.decision == APPROVED and funding(lost.funding) == [(rids[0], 4_000)]
    journaled(harness, lost.authorization_id)
    serve_stale_copy(harness, beneficiary, copy)
    again = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 8_000)
    assert again.decision == APPROVED and funding(again.funding) == [(rids[0], 8_000)]
    journaled(harness, again.authorization_id)
    report = reconcile_family(harness, rids)
    assert report.holds_put_back == 1, report
    reconcile_family(harness, rids)  # the next pass
    return beneficiary, rids


def test_an_over_committed_quota_does_not_block_a_split_across_the_others(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    beneficiary, (first, second, third) = _over_commit_first(
        harness, registry, relationships, authorizations, 3_000, 4_000
    )
    # SQL: the second and third quotas have 7,000 unused and no hold on them.
    assert hot_figures(harness, beneficiary, second) == (3_000, 0)
    assert hot_figures(harness, beneficiary, third) == (4_000, 0)
    answer = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 6_000)
    assert answer.decision == APPROVED, (
        answer.decision,
        answer.decline_reason,
        answer.remaining_quota_fen,
        hot_figures(harness, beneficiary, first),
    )
    assert funding(answer.funding) == [(second, 3_000), (third, 3_000)]
    assert answer.remaining_quota_fen == 1_000


def test_an_over_committed_quota_does_not_shrink_a_partial_approval(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    beneficiary, (first, _second) = _over_commit_first(
        harness, registry, relationships, authorizations, 5_000
    )
    codes = ef.items(registry)
    answer = authorize(
        authorizations,
        PHARMACY,
        beneficiary,
        PHARMACY_PURPOSE,
        6_000,
        lines=[line(codes["drug"], 6_000)],
        allow_partial=True,
    )
    # 5,000 unused and free on the second quota: all of it may be paid.
    assert answer.decision == PARTIAL, answer
    assert answer.approved_amount_fen == 5_000, (
        answer.approved_amount_fen,
        funding(answer.funding),
        hot_figures(harness, beneficiary, first),
    )


def test_remaining_quota_is_never_reported_below_zero(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    beneficiary, (first,) = _over_commit_first(harness, registry, relationships, authorizations)
    assert hot_figures(harness, beneficiary, first) == (-2_000, 12_000)
    answer = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 1_000)
    assert answer.remaining_quota_fen >= 0, answer.remaining_quota_fen


@pytest.mark.parametrize("amount_fen", [1_000, 1_999])  # 1,999: lands on -1
def test_a_credit_landing_on_minus_one_is_not_taken_for_a_missing_quota(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, amount_fen: int
) -> None:
    beneficiary, (rid,) = _over_commit_first(harness, registry, relationships, authorizations)
    assert hot_figures(harness, beneficiary, rid) == (-2_000, 12_000)
    # One of the quota's holds is being captured (claimed, its SQL write under way).
    app = harness.app
    client = harness.admin()
    try:
        pending = [
            member.decode() for member in client.smembers(keys.quota_holds(beneficiary, rid))
        ]
    finally:
        client.close()
    claimed = pending[0]
    merchant_id = get(authorizations, HOSPITAL, claimed).merchant_id
    claim = harness.run(
        app.holds.capture_begin(claimed, merchant_id, new_id("cap"), 0, int(time.time() * 1000))
    )
    assert claim.outcome is CaptureOutcome.OK
    answer = relationships.AllocateQuota(
        relationship_pb2.AllocateQuotaRequest(
            relationship_id=rid, amount_fen=amount_fen, idempotency_key=new_id("alloc")
        ),
        metadata=APP,
    )  # was UNAVAILABLE: the credit's -1 read as "quota missing", its restore BUSY
    assert answer.relationship.allocated_fen == 10_000 + amount_fen
    assert hot_figures(harness, beneficiary, rid) == (amount_fen - 2_000, 12_000)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    yield from own_harness(tmp_path_factory.mktemp("over-committed-dissolved"))


@pytest.fixture(scope="module")
def stubs(server: Harness) -> Iterator[Any]:
    yield from served_stubs(server)


def test_the_drift_of_a_stale_over_committed_quota_is_what_the_ledger_gave_back(
    server: Harness, stubs: Any
) -> None:
    registry, relationships, authorizations, _ = stubs
    beneficiary, (rid,) = _over_commit_first(server, registry, relationships, authorizations)
    assert hot_figures(server, beneficiary, rid) == (-2_000, 12_000)
    unused = ledger(server, rid).unused_fen
    assert unused == 10_000
    dissolved_with_its_redis_step_lost(server, relationships, beneficiary, rid)
    cursor = _cursor_before(server, rid)
    app = server.app
    moved_to, report = server.run(
        reconcile_dissolved_page(app.database, app.quotas, cursor, 1, settled_clock)
    )
    assert moved_to.endswith("|" + rid) and report.drifted == 1, (moved_to, report)
    assert report.drift_fen == unused, report  # was 14,000


def _shown_sanely(shown: relationship_pb2.Relationship) -> None:
    assert shown.available_fen >= 0, (
        f"available_fen {shown.available_fen} (held {shown.held_fen}, "
        f"allocated {shown.allocated_fen}, spent {shown.spent_fen})"
    )
    assert shown.held_fen <= shown.allocated_fen - shown.spent_fen, shown


def test_get_relationship_does_not_show_available_below_zero(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    beneficiary, (rid,) = _over_commit_first(harness, registry, relationships, authorizations)
    assert hot_figures(harness, beneficiary, rid) == (-2_000, 12_000)
    # Authorize says nothing is left ...
    answer = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 1_000)
    assert answer.remaining_quota_fen == 0
    # ... GetRelationship says -2,000 is free to authorize, 12,000 held of a 10,000 quota.
    _shown_sanely(factories.relationship(relationships, rid))


def test_list_relationships_does_not_show_available_below_zero(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    beneficiary, (rid, other) = _over_commit_first(
        harness, registry, relationships, authorizations, 3_000
    )
    listed = relationships.ListRelationships(
        relationship_pb2.ListRelationshipsRequest(beneficiary_id=beneficiary), metadata=APP
    ).relationships
    shown = {r.relationship_id: r for r in listed}
    assert set(shown) == {rid, other}
    _shown_sanely(shown[rid])


def test_allocate_answer_does_not_show_available_below_zero(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    beneficiary, (rid,) = _over_commit_first(harness, registry, relationships, authorizations)
    answer = relationships.AllocateQuota(
        relationship_pb2.AllocateQuotaRequest(
            relationship_id=rid, amount_fen=1_000, idempotency_key=new_id("alloc")
        ),
        metadata=APP,
    )
    assert answer.relationship.allocated_fen == 11_000
    assert hot_figures(harness, beneficiary, rid) == (-1_000, 12_000)
    _shown_sanely(answer.relationship)  # available_fen -1,000


def test_release_refusal_does_not_name_a_negative_available(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    _beneficiary, (rid,) = _over_commit_first(harness, registry, relationships, authorizations)
    with pytest.raises(grpc.RpcError) as caught:
        relationships.ReleaseQuota(
            relationship_pb2.ReleaseQuotaRequest(
                relationship_id=rid, amount_fen=1_000, idempotency_key=new_id("release")
            ),
            metadata=APP,
        )
    error = caught.value
    assert factories.error_info(error).reason == "INSUFFICIENT_QUOTA", error.details()
    assert "-" not in (error.details() or ""), error.details()
