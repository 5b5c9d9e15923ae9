"""Captures written set-based in batches (service/capture_writer.py): every capture in a batch
gets its own outcome, and one that breaks the batch cannot fail the others.

These submit to the running service's capture writer directly (real SQL, one event loop), all
in one loop iteration, so they share one batch as concurrent Capture calls do.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from authz_server.domain.errors import IdempotencyKeyReused, PolicyRefusal, Unavailable
from authz_server.domain.types import Purpose
from authz_server.generated.medwallet.v1 import (
    common_pb2,
    registry_pb2_grpc,
    relationship_pb2,
    relationship_pb2_grpc,
)
from authz_server.service.capture_writer import (
    CAPTURE_WRITE_DEADLINE_SECONDS,
    CapturedInLedger,
    CaptureUnit,
    CaptureWriter,
)
from authz_server.service.clock import Clock, system_clock
from authz_server.service.idempotency import Idempotency
from authz_server.service.views import AuthorizationView
from authz_server.storage.redis.hold_store import STALE_CAPTURE_SECONDS
from authz_server.storage.sql.tables import (
    CapturePartRow,
    CaptureRow,
    IdempotencyRecordRow,
    LedgerEntryRow,
    RelationshipRow,
)
from tests import factories
from tests.harness import APP, Harness, new_id

SCOPE = "capture:merchant-batch"
# The service's clock (tests move it forward): a capture's time is the clock's, as in the service.
_clock: list[Clock] = [system_clock]


@pytest.fixture(autouse=True)
def service_clock(harness: Harness) -> None:
    _clock[0] = harness.clock


def encode(view: AuthorizationView) -> bytes:
    return f"{view.authorization_id}:{view.captured_fen}".encode()


def unit(
    relationship_id: str,
    fen: int,
    key: str | None,
    *,
    authorization_id: str = "",
    digest: str = "d",
) -> CaptureUnit:
    return CaptureUnit(
        authorization_id=authorization_id or uuid.uuid4().hex,
        merchant_id="merchant-batch",
        merchant_region="110000",
        beneficiary_id="beneficiary",
        purpose=Purpose.PHARMACY,
        approved_fen=fen,
        funding=((relationship_id, fen),),
        parts=((relationship_id, fen),),
        call=Idempotency(SCOPE, key, digest, encode) if key else None,
        now=_clock[0](),
        created_at=None,
        expires_at=None,
    )


async def submit_together(writer: CaptureWriter, units: list[CaptureUnit]) -> list[Any]:
    sizes: list[int] = []
    writer.observe, observe = (lambda size, _s: sizes.append(size)), writer.observe
    try:
        results = await asyncio.gather(*(writer.submit(u) for u in units), return_exceptions=True)
    finally:
        writer.observe = observe
    assert sizes == [len(units)], f"expected one batch of {len(units)}, got {sizes}"
    return list(results)


@pytest.fixture()
def quotas(
    harness: Harness,
    registry: registry_pb2_grpc.RegistryServiceStub,
    relationships: relationship_pb2_grpc.RelationshipServiceStub,
) -> tuple[str, str]:
    """An active relationship and a dissolved one."""
    holder = factories.employee(registry, balance_fen=100_000)
    active = factories.active_relationship(
        relationships, holder, factories.employee(registry), 50_000
    )
    dissolved = factories.active_relationship(
        relationships, holder, factories.employee(registry), 10_000
    )
    relationships.DissolveRelationship(
        relationship_pb2.DissolveRelationshipRequest(
            relationship_id=dissolved, party=common_pb2.PARTY_HOLDER
        ),
        metadata=APP,
    )
    return active, dissolved


def captured_total(harness: Harness, relationship_id: str) -> int:
    return harness.app.database.transaction(
        lambda session: session.get(RelationshipRow, relationship_id).captured_total_fen
    )


def test_each_capture_in_a_batch_gets_its_own_outcome(
    harness: Harness, quotas: tuple[str, str]
) -> None:
    active, dissolved = quotas
    writer = harness.app.authorizations.captures.writer
    earlier_key = new_id("k")
    earlier = harness.run(writer.submit(unit(active, 100, earlier_key)))
    assert isinstance(earlier, AuthorizationView)

    fresh_key = new_id("k")
    fresh = unit(active, 700, fresh_key)
    batch = [
        fresh,
        unit(active, 100, earlier_key),  # a replay: the first answer, byte for byte
        unit(active, 100, earlier_key, digest="other request"),  # the key reused
        unit(dissolved, 300, new_id("k")),  # the relationship was dissolved
        unit(active, 200, new_id("k"), authorization_id=fresh.authorization_id),  # twice
        unit(active, 50, fresh_key),  # the fresh capture's key, for another authorization
        unit(active, 400, None),  # a one-step payment's capture (no key of its own)
    ]
    results = harness.run(submit_together(writer, batch))

    assert isinstance(results[0], AuthorizationView) and results[0].captured_fen == 700
    assert results[1] == encode(earlier)
    assert isinstance(results[2], IdempotencyKeyReused)
    assert isinstance(results[3], PolicyRefusal) and results[3].reason == "RELATIONSHIP_NOT_ACTIVE"
    assert isinstance(results[4], CapturedInLedger) and results[4].parts == f"{active}=700"
    assert isinstance(results[5], Unavailable)
    assert isinstance(results[6], AuthorizationView) and results[6].captured_fen == 400
    assert captured_total(harness, active) == 100 + 700 + 400
    assert captured_total(harness, dissolved) == 0

    def rows(session: Any) -> tuple[int, int, int, int]:
        ids = [u.authorization_id for u in batch]
        count = func.count()
        return (
            session.scalar(select(count).where(CaptureRow.authorization_id.in_(ids))),
            session.scalar(select(count).where(CapturePartRow.authorization_id.in_(ids))),
            session.scalar(
                select(func.sum(LedgerEntryRow.amount_fen)).where(
                    LedgerEntryRow.authorization_id.in_(ids), LedgerEntryRow.kind == "CAPTURE"
                )
            ),
            session.scalar(
                select(count).where(
                    IdempotencyRecordRow.scope == SCOPE,
                    IdempotencyRecordRow.idempotency_key == fresh_key,
                )
            ),
        )

    assert harness.app.database.transaction(rows) == (2, 2, 1_100, 1)


def test_a_capture_that_breaks_its_batch_fails_alone(
    harness: Harness, quotas: tuple[str, str]
) -> None:
    active, _ = quotas
    writer = harness.app.authorizations.captures.writer

    def broken(_view: AuthorizationView) -> bytes:
        raise RuntimeError("cannot encode")

    bad = unit(active, 10, new_id("k"))
    bad = CaptureUnit(**{**bad.__dict__, "call": Idempotency(SCOPE, new_id("k"), "d", broken)})
    good = [unit(active, 20, new_id("k")) for _ in range(3)]
    before = captured_total(harness, active)
    results = harness.run(submit_together(writer, [good[0], bad, good[1], good[2]]))

    assert isinstance(results[1], RuntimeError)
    assert all(isinstance(r, AuthorizationView) for r in (results[0], results[2], results[3]))
    assert captured_total(harness, active) == before + 60


def test_a_capture_that_waited_past_its_write_deadline_is_not_written(
    harness: Harness, quotas: tuple[str, str]
) -> None:
    """The sweeper settles a claim CAPTURING for STALE_CAPTURE_SECONDS as SQL says; a capture
    still queued then must not be written afterwards (its hold would be put back while SQL
    counts the money as spent), so one past its deadline is refused, retryable."""
    assert CAPTURE_WRITE_DEADLINE_SECONDS * 2 < STALE_CAPTURE_SECONDS
    active, _ = quotas
    writer = harness.app.authorizations.captures.writer
    before = captured_total(harness, active)
    fresh = unit(active, 30, new_id("k"))
    waited = unit(active, 40, new_id("k"))
    waited = replace(waited, now=waited.now - timedelta(seconds=CAPTURE_WRITE_DEADLINE_SECONDS + 1))
    results = harness.run(submit_together(writer, [fresh, waited]))
    assert isinstance(results[0], AuthorizationView)
    assert isinstance(results[1], Unavailable)
    assert captured_total(harness, active) == before + 30
