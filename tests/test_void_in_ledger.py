"""A Void is decided in SQL first, under the locks of the quotas funding the hold, and the
capture writer refuses an authorization voided there (issue 12). Without that, a hold put back
by a rebuild of Redis while its capture was still being written could be voided in Redis (its
money given back) and captured in SQL (the money spent): Redis overstated the quota by the
capture, and the till was told VOIDED for a payment that was made."""

from __future__ import annotations

from typing import Any

import grpc

from authz_server.domain.errors import PolicyRefusal
from authz_server.domain.funding import parse_funding
from authz_server.domain.types import Purpose
from authz_server.service.capture_writer import CaptureUnit
from authz_server.storage.sql.tables import AuthorizationRow
from tests.harness import Harness, lose_redis
from tests.test_authorization_rules import (
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    VOIDED,
    authorize,
    capture,
    family,
    figures,
    get,
    refused,
    register_merchants,
    void,
)


def written_behind_redis(harness: Harness, authorization_id: str) -> Any:
    """The capture of `authorization_id` written to SQL by the capture writer itself, as a
    capture whose claim Redis lost (a rebuild came between its claim and its commit) is."""
    app = harness.app
    row = app.database.transaction(lambda session: session.get(AuthorizationRow, authorization_id))
    funding = parse_funding(row.funding)
    unit = CaptureUnit(
        authorization_id=authorization_id,
        merchant_id=row.merchant_id,
        merchant_region="110000",
        beneficiary_id=row.beneficiary_id,
        purpose=Purpose(row.purpose),
        approved_fen=row.approved_fen,
        funding=funding,
        parts=funding,
        call=None,
        now=harness.clock(),
        created_at=None,
        expires_at=None,
    )

    async def submit() -> Any:
        try:
            return await app.authorizations.captures.writer.submit(unit)
        except PolicyRefusal as refusal:
            return refusal

    return harness.run(submit())


def test_a_void_after_a_capture_committed_behind_redis_answers_already_captured(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 30_000)
    [rid] = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
    lose_redis(harness)  # the hold is put back from SQL (rs = 1)
    assert not isinstance(written_behind_redis(harness, held.authorization_id), PolicyRefusal)
    refused(
        lambda: void(authorizations, HOSPITAL, held.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )
    # Redis follows SQL: the money is spent, not given back.
    assert figures(relationships, rid) == (22_000, 0, 8_000)
    assert get(authorizations, HOSPITAL, held.authorization_id).status == CAPTURED


def test_a_capture_written_after_a_void_is_refused(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    fam = family(registry, relationships, 30_000)
    [rid] = fam.relationship_ids
    held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 8_000)
    assert void(authorizations, HOSPITAL, held.authorization_id).status == VOIDED
    refusal = written_behind_redis(harness, held.authorization_id)
    assert isinstance(refusal, PolicyRefusal) and refusal.reason == "ALREADY_VOIDED"
    assert figures(relationships, rid) == (30_000, 0, 0)
    refused(
        lambda: capture(authorizations, HOSPITAL, held.authorization_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_VOIDED",
    )
