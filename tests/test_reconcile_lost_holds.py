"""The reconcile puts back an open hold SQL has and Redis lost without a loss being noticed
(helper audit, session 19): a beneficiary's slot served as an older copy (here: its keys DUMPed
before the hold and RESTOREd after, as a stale node serves them) while the generation it
carries is still the published one. The quota's sum then agrees with the ledger, so a
reconcile that compared sums only found no drift, and the money the approved hold held was
approved a second time; the first approval could not be captured. Now each page's open holds
(read under its row locks) that Redis does not know at all are put back, counted as drift."""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from authz_server import cli
from authz_server.domain.errors import Unavailable
from authz_server.runtime.reconcile import ReconcileReport, reconcile_page
from authz_server.runtime.reconcile_holds import VOID_SETTLED_SECONDS
from authz_server.storage.redis import keys
from authz_server.storage.redis.hold_store import HoldStore
from authz_server.storage.sql.tables import RelationshipRow
from tests import factories
from tests.harness import Harness
from tests.test_authorization_recovery import hot_figures, journaled
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    funding,
    register_merchants,
    void,
)


def snapshot_slot(harness: Harness, beneficiary_id: str) -> dict[bytes, bytes]:
    """DUMP of every key of the beneficiary's hash tag: what a replica holds at this moment."""
    client = harness.admin()
    try:
        pattern = keys.prefix(beneficiary_id) + ":*"
        return {key: client.dump(key) for key in client.scan_iter(match=pattern, count=1000)}
    finally:
        client.close()


def serve_stale_copy(harness: Harness, beneficiary_id: str, copy: dict[bytes, bytes]) -> None:
    """The slot as the replica that missed the writes since `copy` serves it once promoted."""
    client = harness.admin()
    try:
        pattern = keys.prefix(beneficiary_id) + ":*"
        for key in list(client.scan_iter(match=pattern, count=1000)):
            if key not in copy:
                client.delete(key)
        for key, value in copy.items():
            client.restore(key, 0, value, replace=True)
    finally:
        client.close()


def reconcile_family(
    harness: Harness, relationship_ids: list[str], rolling: bool = False
) -> ReconcileReport:
    """The reconcile's pages over these quotas only, a page each (each with its holds, as every
    page of a pass), in the pass's order: what a pass does to them, without a pass over every
    quota of the session (seconds on PostgreSQL once the session has made thousands, and other
    tests' leftovers counted in the report). A page of one quota each puts a beneficiary's
    quotas in different pages, as a province's random relationship ids nearly always do."""
    app = harness.app
    report = ReconcileReport(quotas=0, drifted=0, drift_fen=0)
    for relationship_id in sorted(relationship_ids):

        def before(session: Any, relationship_id: str = relationship_id) -> str:
            found = session.scalar(
                select(func.max(RelationshipRow.relationship_id)).where(
                    RelationshipRow.relationship_id < relationship_id
                )
            )
            return found or ""

        last, page = harness.run(
            reconcile_page(
                app.database, app.quotas, app.database.transaction(before), 1,
                rolling=rolling, holds=app.holds, clock=harness.clock,
            )
        )  # fmt: skip
        assert last == relationship_id, (last, relationship_id)
        report = report.plus(page)
    return report


def test_an_approved_hold_lost_by_a_stale_copy_is_put_back_not_spent_twice(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 10_000)
    beneficiary, (relationship_id,) = fam.beneficiary_id, fam.relationship_ids
    copy = snapshot_slot(harness, beneficiary)

    first = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 6_000)
    assert first.decision == APPROVED
    journaled(harness, first.authorization_id)  # the till was told APPROVED: SQL has it

    serve_stale_copy(harness, beneficiary, copy)
    assert hot_figures(harness, beneficiary, relationship_id) == (10_000, 0)

    report = reconcile_family(harness, [relationship_id])
    assert report.holds_put_back == 1 and report.drifted >= 1 and report.overstated >= 1
    assert hot_figures(harness, beneficiary, relationship_id) == (4_000, 6_000)

    second = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 6_000)
    assert second.decision == DECLINED
    assert capture(authorizations, HOSPITAL, first.authorization_id).status == CAPTURED
    # Nothing more to put back: a second pass finds Redis as SQL says.
    again = reconcile_family(harness, [relationship_id])
    assert (again.holds_put_back, again.drifted) == (0, 0)


def test_a_split_hold_lost_by_a_stale_copy_is_put_back_on_each_of_its_quotas(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """A hold funded by two quotas, which fall in different pages of the reconcile (or the
    same): put back on both, once."""
    register_merchants(registry)
    fam = family(registry, relationships, 3_000, 3_000)
    beneficiary, (one, two) = fam.beneficiary_id, fam.relationship_ids
    copy = snapshot_slot(harness, beneficiary)
    held = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 5_000)
    assert held.decision == APPROVED
    journaled(harness, held.authorization_id)
    serve_stale_copy(harness, beneficiary, copy)

    report = reconcile_family(harness, [one, two])
    assert report.holds_put_back == 1
    figures = sorted(
        [hot_figures(harness, beneficiary, one), hot_figures(harness, beneficiary, two)]
    )
    assert figures == [(0, 3_000), (1_000, 2_000)]
    assert capture(authorizations, HOSPITAL, held.authorization_id).status == CAPTURED


def test_a_hold_voided_in_sql_whose_redis_step_was_lost_is_voided_by_the_reconcile(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """A Void commits in SQL first, then voids in Redis; that step lost (a Redis timeout, the
    till gives up), Redis held the money until the hold expired (24 h at a hospital): the sums
    agreed, so the reconcile found nothing, and payments were declined on money the family has.
    A hold SQL voided over VOID_SETTLED_SECONDS ago and still PENDING in Redis is voided there."""
    register_merchants(registry)
    fam = family(registry, relationships, 10_000)
    beneficiary, (relationship_id,) = fam.beneficiary_id, fam.relationship_ids
    app = harness.app
    held = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 6_000)
    assert held.decision == APPROVED
    real_void = app.holds.void

    async def lost(*arguments: Any) -> Any:
        raise Unavailable("the quota store did not answer: TimeoutError")

    app.holds.void = lost  # type: ignore[method-assign]
    try:
        with pytest.raises(grpc.RpcError) as failed:
            void(authorizations, HOSPITAL, held.authorization_id)
    finally:
        app.holds.void = real_void  # type: ignore[method-assign]
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert hot_figures(harness, beneficiary, relationship_id) == (4_000, 6_000)

    # A void's own Redis step may still be on its way: left alone for VOID_SETTLED_SECONDS.
    report = reconcile_family(harness, [relationship_id])
    assert report.holds_voided == 0
    harness.clock.advance(VOID_SETTLED_SECONDS + 1)
    report = reconcile_family(harness, [relationship_id])
    assert report.holds_voided == 1 and report.drifted >= 1
    assert hot_figures(harness, beneficiary, relationship_id) == (10_000, 0)
    assert authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 8_000).decision == APPROVED


def test_a_lost_hold_on_a_quota_the_stale_copy_lacks_is_put_back_in_the_same_pass(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """The copy predates the second relationship: it lacks that quota and the hold on it. Put
    back before the quotas were set, hold_restore.lua placed nothing (a quota it does not have
    active), and the quota came back with all its money available (a second audit)."""
    register_merchants(registry)
    fam = family(registry, relationships, 1_000)
    beneficiary = fam.beneficiary_id
    copy = snapshot_slot(harness, beneficiary)  # before the second relationship was active

    holder = factories.employee(registry, balance_fen=100_000)
    second_quota = factories.active_relationship(relationships, holder, beneficiary, 9_000)
    held = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 6_000)
    assert held.decision == APPROVED
    assert second_quota in dict(funding(held.funding))
    journaled(harness, held.authorization_id)
    serve_stale_copy(harness, beneficiary, copy)  # the hold and the second quota are gone

    report = reconcile_family(harness, [*fam.relationship_ids, second_quota])
    assert report.holds_put_back == 1, report
    assert authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 6_000).decision == DECLINED


def test_a_stale_copys_voided_hold_does_not_overstate_a_quota_spent_since(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    """Voided after the quota was set, a stale hold moved its whole amount back to available,
    more than the held figure the restore had (then) capped at the ledger's unused: Redis overstated
    the quota (a third audit). The voids come before the quotas are set."""
    register_merchants(registry)
    fam = family(registry, relationships, 10_000)
    beneficiary, (relationship_id,) = fam.beneficiary_id, fam.relationship_ids
    stale = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 5_000)
    assert stale.decision == APPROVED
    journaled(harness, stale.authorization_id)
    copy = snapshot_slot(harness, beneficiary)  # 5,000 available, 5,000 held

    void(authorizations, HOSPITAL, stale.authorization_id)
    paid = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 8_000)
    assert paid.decision == APPROVED
    journaled(harness, paid.authorization_id)
    assert capture(authorizations, HOSPITAL, paid.authorization_id).status == CAPTURED
    serve_stale_copy(harness, beneficiary, copy)  # the ledger: 2,000 unused, no open hold
    harness.clock.advance(VOID_SETTLED_SECONDS + 1)

    report = reconcile_family(harness, [relationship_id])
    assert report.holds_voided == 1, report
    assert hot_figures(harness, beneficiary, relationship_id) == (2_000, 0)
    assert authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 4_000).decision == DECLINED


def test_the_reconcile_command_fails_when_a_lost_hold_could_not_be_put_back(
    harness: Harness,
    registry: Any,
    relationships: Any,
    authorizations: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outside the rolling reconcile a hold Redis fails on fails the run, as a quota does: the
    reconcile Job reported success while the family's held money was available again."""
    register_merchants(registry)
    fam = family(registry, relationships, 10_000)
    beneficiary, (relationship_id,) = fam.beneficiary_id, fam.relationship_ids
    copy = snapshot_slot(harness, beneficiary)
    held = authorize(authorizations, HOSPITAL, beneficiary, MEDICAL, 6_000)
    assert held.decision == APPROVED
    journaled(harness, held.authorization_id)
    serve_stale_copy(harness, beneficiary, copy)  # the approved hold is gone from Redis

    async def times_out(self: HoldStore, *arguments: Any) -> bool:
        raise Unavailable("the quota store did not answer: TimeoutError")

    monkeypatch.setattr(HoldStore, "restore_hold", times_out)  # the command's own storage too
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(Unavailable):
        harness.run(cli._reconcile(replace(harness.settings, redis_url=harness.redis_url)))
    monkeypatch.undo()
    assert hot_figures(harness, beneficiary, relationship_id) == (10_000, 0)  # not put back
    report = reconcile_family(harness, [relationship_id])
    assert report.holds_put_back == 1
    assert hot_figures(harness, beneficiary, relationship_id) == (4_000, 6_000)
