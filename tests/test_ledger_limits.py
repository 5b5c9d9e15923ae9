"""SQL enforces every quota (issue 12, point 1): whatever Redis approved, the ledger never pays
out more than a quota holds (captured - refunded_to_quota + released <= allocated), checked in
the transaction that moves the money and as CHECK constraints on the running totals.

Redis is made to overstate a quota on purpose (its `available` raised behind the scripts' back),
as a second server on the same data, or a Redis restored from an older copy, would.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from alembic import command
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.exc import IntegrityError

from authz_server.domain.errors import LedgerLimitExceeded
from authz_server.domain.model import QuotaTotals
from authz_server.domain.types import Purpose
from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.generated.medwallet.v1 import relationship_pb2
from authz_server.service.capture_writer import CaptureUnit
from authz_server.service.idempotency import Idempotency
from authz_server.service.views import AuthorizationView
from authz_server.storage.redis import keys
from authz_server.storage.sql.migrate import alembic_config
from authz_server.storage.sql.tables import (
    CaptureRow,
    LedgerEntryRow,
    ParticipantRow,
    RelationshipRow,
)
from tests import factories
from tests.harness import APP, Harness, drop_database, fresh_database, new_id
from tests.test_authorization_rules import (
    COLLECTOR,
    HOSPITAL,
    MEDICAL,
    RESIDENT_PREMIUM,
    assert_declined,
    authorize,
    capture,
    family,
    figures,
    get,
    refused,
    register_merchants,
)

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


def refusals(operation: str) -> float:
    return (
        REGISTRY.get_sample_value("medwallet_ledger_limit_refusals_total", {"operation": operation})
        or 0.0
    )


def overstate(harness: Harness, beneficiary_id: str, relationship_id: str, fen: int) -> None:
    """Raises the quota's available figure in Redis only: Redis now overstates it."""
    harness.run(
        harness.client.hincrby(keys.quota(beneficiary_id, relationship_id), "available", fen)
    )


def totals(harness: Harness, relationship_id: str) -> tuple[int, int, int, int]:
    def read(session: Any) -> tuple[int, int, int, int]:
        row = session.get(RelationshipRow, relationship_id)
        session.refresh(row)
        return (
            row.allocated_total_fen,
            row.released_total_fen,
            row.captured_total_fen,
            row.refunded_to_quota_total_fen,
        )

    return harness.app.database.transaction(read)


def ledger_rows(harness: Harness, relationship_id: str) -> list[str]:
    """The kinds of the relationship's ledger rows, oldest first."""
    return harness.app.database.transaction(
        lambda session: list(
            session.scalars(
                select(LedgerEntryRow.kind)
                .where(LedgerEntryRow.relationship_id == relationship_id)
                .order_by(LedgerEntryRow.entry_id)
            )
        )
    )


def captures_of(harness: Harness, beneficiary_id: str) -> int:
    count: int = harness.app.database.transaction(
        lambda session: session.scalar(
            select(func.count()).where(CaptureRow.beneficiary_id == beneficiary_id)
        )
    )
    return count


def test_a_capture_the_ledger_cannot_pay_is_refused_and_its_hold_voided(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    fam = family(registry, relationships, 10_000)
    [rid] = fam.relationship_ids
    overstate(harness, fam.beneficiary_id, rid, 5_000)
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    assert (held.decision, held.approved_amount_fen) == (pb.DECISION_APPROVED, 12_000), held
    before = refusals("capture")

    key = new_id("capture")
    refused(
        lambda: capture(authorizations, HOSPITAL, held.authorization_id, key=key),
        FAILED_PRECONDITION,
        "LEDGER_LIMIT_EXCEEDED",
    )

    # Nothing written: no capture, no ledger row beyond the allocation, totals as they were.
    assert captures_of(harness, fam.beneficiary_id) == 0
    assert ledger_rows(harness, rid) == ["QUOTA_ALLOCATION"]
    assert totals(harness, rid) == (10_000, 0, 0, 0)
    assert refusals("capture") == before + 1
    # The hold is voided; a retry of the capture is told the same.
    assert (
        get(authorizations, HOSPITAL, held.authorization_id).status
        == pb.AUTHORIZATION_STATUS_VOIDED
    )
    refused(
        lambda: capture(authorizations, HOSPITAL, held.authorization_id, key=key),
        FAILED_PRECONDITION,
        "LEDGER_LIMIT_EXCEEDED",
    )
    assert refusals("capture") == before + 1  # the retry was answered by Redis, not the ledger
    # Redis was set from the ledger: it offers what the ledger has, and that can be paid.
    assert figures(relationships, rid) == (10_000, 0, 0)
    again = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
    assert_declined(again, pb.DECLINE_REASON_INSUFFICIENT_QUOTA, 10_000)
    paid = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 10_000)
    assert capture(authorizations, HOSPITAL, paid.authorization_id).captured_amount_fen == 10_000
    assert totals(harness, rid) == (10_000, 0, 10_000, 0)
    assert figures(relationships, rid) == (0, 0, 10_000)


def test_a_premium_the_ledger_cannot_pay_is_refused_and_nothing_written(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    fam = family(registry, relationships, 10_000)
    [rid] = fam.relationship_ids
    overstate(harness, fam.beneficiary_id, rid, 5_000)
    before = refusals("capture")
    key = new_id("premium")

    refused(
        lambda: authorize(
            authorizations, COLLECTOR, fam.beneficiary_id, RESIDENT_PREMIUM, 12_000,
            idempotency_key=key,
        ),
        FAILED_PRECONDITION,
        "LEDGER_LIMIT_EXCEEDED",
    )  # fmt: skip

    assert captures_of(harness, fam.beneficiary_id) == 0
    assert ledger_rows(harness, rid) == ["QUOTA_ALLOCATION"]
    assert totals(harness, rid) == (10_000, 0, 0, 0)
    assert refusals("capture") == before + 1
    assert figures(relationships, rid) == (10_000, 0, 0)  # Redis set from the ledger
    # Nothing was paid: a retry with the key decides anew, on what the ledger has.
    retried = authorize(
        authorizations, COLLECTOR, fam.beneficiary_id, RESIDENT_PREMIUM, 12_000,
        idempotency_key=key,
    )  # fmt: skip
    assert_declined(retried, pb.DECLINE_REASON_INSUFFICIENT_QUOTA, 10_000)
    paid = authorize(authorizations, COLLECTOR, fam.beneficiary_id, RESIDENT_PREMIUM, 10_000)
    assert (paid.decision, paid.status) == (pb.DECISION_APPROVED, pb.AUTHORIZATION_STATUS_CAPTURED)
    assert totals(harness, rid) == (10_000, 0, 10_000, 0)


def test_a_release_the_ledger_cannot_pay_is_refused_insufficient_quota(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    fam = family(registry, relationships, 10_000, spare=0)
    [rid] = fam.relationship_ids
    [holder] = fam.holder_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 4_000)
    assert held.decision == pb.DECISION_APPROVED
    overstate(harness, fam.beneficiary_id, rid, 5_000)  # available 11,000; the ledger has 10,000
    before = refusals("release")

    refused(
        lambda: relationships.ReleaseQuota(
            relationship_pb2.ReleaseQuotaRequest(
                relationship_id=rid, amount_fen=10_500, idempotency_key=new_id("release")
            ),
            metadata=APP,
        ),
        FAILED_PRECONDITION,
        "INSUFFICIENT_QUOTA",
    )

    assert totals(harness, rid) == (10_000, 0, 0, 0)
    assert ledger_rows(harness, rid) == ["QUOTA_ALLOCATION"]
    assert factories.balance(registry, holder) == 0
    assert refusals("release") == before + 1
    assert figures(relationships, rid) == (6_000, 4_000, 0)  # Redis set from the ledger
    assert capture(authorizations, HOSPITAL, held.authorization_id).captured_amount_fen == 4_000


def _unit(harness: Harness, relationship_id: str, fen: int) -> CaptureUnit:
    def encode(view: AuthorizationView) -> bytes:
        return f"{view.authorization_id}:{view.captured_fen}".encode()

    return CaptureUnit(
        authorization_id=uuid.uuid4().hex,
        merchant_id="merchant-ledger",
        merchant_region="110000",
        beneficiary_id="beneficiary",
        purpose=Purpose.PHARMACY,
        approved_fen=fen,
        funding=((relationship_id, fen),),
        parts=((relationship_id, fen),),
        call=Idempotency("capture:merchant-ledger", new_id("k"), "d", encode),
        now=harness.clock(),
        created_at=None,
        expires_at=None,
    )


def test_a_batch_writes_the_captures_the_ledger_can_pay_and_refuses_the_others(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    """One batch, one transaction: each capture is checked against what the ledger has left
    after the batch's earlier captures; one it cannot pay is refused alone."""
    holder = factories.employee(registry, balance_fen=2_000)
    rid = factories.active_relationship(relationships, holder, factories.employee(registry), 1_000)
    other = factories.active_relationship(
        relationships, holder, factories.employee(registry), 1_000
    )
    writer = harness.app.authorizations.captures.writer
    batch = [
        _unit(harness, rid, 300),
        _unit(harness, rid, 800),  # 300 + 800 > 1,000
        _unit(harness, rid, 500),  # 800
        _unit(harness, other, 1_000),  # another quota, paid in full
        _unit(harness, rid, 300),  # 1,100 > 1,000
        _unit(harness, rid, 200),  # 1,000: all of it
    ]
    before = refusals("capture")
    sizes: list[int] = []
    writer.observe, observe = (lambda size, _s: sizes.append(size)), writer.observe

    async def together() -> list[Any]:
        return list(
            await asyncio.gather(*(writer.submit(u) for u in batch), return_exceptions=True)
        )

    try:
        results = harness.run(together())
    finally:
        writer.observe = observe
    assert sizes == [len(batch)], f"expected one batch of {len(batch)}, got {sizes}"

    written = [isinstance(result, AuthorizationView) for result in results]
    assert written == [True, False, True, True, False, True], results
    for result in (results[1], results[4]):
        assert isinstance(result, LedgerLimitExceeded), result
        assert (result.reason, result.relationship_id) == ("LEDGER_LIMIT_EXCEEDED", rid)
    assert (results[1].unused_fen, results[4].unused_fen) == (700, 200)
    assert totals(harness, rid) == (1_000, 0, 1_000, 0)
    assert totals(harness, other) == (1_000, 0, 1_000, 0)
    assert ledger_rows(harness, rid) == ["QUOTA_ALLOCATION"] + ["CAPTURE"] * 3
    refused_ids = [batch[1].authorization_id, batch[4].authorization_id]
    assert (
        harness.app.database.transaction(
            lambda session: session.scalar(
                select(func.count()).where(CaptureRow.authorization_id.in_(refused_ids))
            )
        )
        == 0
    )
    assert refusals("capture") == before + 2


TOTALS_FIELDS = (
    "allocated_total_fen",
    "released_total_fen",
    "captured_total_fen",
    "refunded_to_quota_total_fen",
)
BAD_TOTALS = [
    # (what the update sets, the one rule it breaks)
    ({"captured_total_fen": 10_001}, "within_allocation"),
    ({"released_total_fen": 6_001, "captured_total_fen": 4_000}, "within_allocation"),
    (
        {"captured_total_fen": 3_000, "refunded_to_quota_total_fen": 4_000},
        "refunds_within_captures",
    ),
    ({"released_total_fen": -1}, "totals_not_negative"),
    ({"refunded_to_quota_total_fen": -1}, "totals_not_negative"),
]


@pytest.mark.parametrize(("values", "rule"), BAD_TOTALS, ids=[rule for _, rule in BAD_TOTALS])
def test_the_database_refuses_totals_beyond_the_ledger_limit(
    harness: Harness, registry: Any, relationships: Any, values: dict[str, int], rule: str
) -> None:
    holder = factories.employee(registry, balance_fen=10_000)
    rid = factories.active_relationship(relationships, holder, factories.employee(registry), 10_000)
    database = harness.app.database
    statement = update(RelationshipRow).where(RelationshipRow.relationship_id == rid)
    with (
        pytest.raises(IntegrityError) as caught,
        database.writing(),
        database.engine.begin() as connection,
    ):
        connection.execute(statement.values(**values))
    assert f"ck_relationships_{rule}" in str(caught.value)
    assert totals(harness, rid) == (10_000, 0, 0, 0)
    # The domain's statement of the rule agrees with the database's.
    fields = dict(zip(TOTALS_FIELDS, (10_000, 0, 0, 0), strict=True))
    assert QuotaTotals(**fields).within_ledger_limit
    assert not QuotaTotals(**{**fields, **values}).within_ledger_limit
    # At the limit is allowed: all of it captured, half refunded, the rest released.
    with database.writing(), database.engine.begin() as connection:
        connection.execute(
            statement.values(
                captured_total_fen=10_000,
                refunded_to_quota_total_fen=5_000,
                released_total_fen=5_000,
            )
        )
    assert totals(harness, rid) == (10_000, 5_000, 10_000, 5_000)
    assert QuotaTotals(10_000, 5_000, 10_000, 5_000).within_ledger_limit


def test_the_migration_names_relationships_already_beyond_the_limit(tmp_path: Path) -> None:
    """Migration 0004 adds the constraints only over a ledger that keeps them; otherwise it
    stops and names what breaks them (a constraint over such rows would refuse their refunds)."""
    url = fresh_database(os.environ.get("TEST_DATABASE_URL"), tmp_path)
    config = alembic_config(url)
    engine = create_engine(url)
    try:
        command.downgrade(config, "0003")
        now = "2026-12-01 00:00:00"
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO participants (participant_id, scheme, pooling_region, status,"
                    " balance_fen, created_at, updated_at)"
                    " VALUES ('holder', 'EMPLOYEE', '110100', 'ACTIVE', 0, :now, :now)"
                ),
                {"now": now},
            )
            connection.execute(
                text(
                    "INSERT INTO relationships (relationship_id, holder_id, beneficiary_id,"
                    " relation, status, holder_consented, beneficiary_consented,"
                    " created_channel, created_at, allocated_total_fen, released_total_fen,"
                    " captured_total_fen, refunded_to_quota_total_fen) VALUES"
                    " ('over', 'holder', 'holder', 'PARENT', 'ACTIVE', true, true, 'APP', :now,"
                    " 200000, 0, 207400, 0)"
                ),
                {"now": now},
            )
        with pytest.raises(
            RuntimeError, match="over: allocated 200000, released 0, captured 207400"
        ):
            command.upgrade(config, "head")
        with engine.begin() as connection:  # settled: the migration goes through
            connection.execute(
                update(RelationshipRow)
                .where(RelationshipRow.relationship_id == "over")
                .values(allocated_total_fen=207_400)
            )
        command.upgrade(config, "head")
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(
                update(RelationshipRow)
                .where(RelationshipRow.relationship_id == "over")
                .values(captured_total_fen=207_401)
            )
        with engine.begin() as connection:
            assert connection.scalar(select(ParticipantRow.participant_id)) == "holder"
    finally:
        engine.dispose()
        drop_database(url)
