"""After Redis loses its data, a till's retry gets its original answer and never pays twice;
a capture SQL already has is never undone by a later attempt."""

from __future__ import annotations

from sqlalchemy import delete

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.generated.medwallet.v1 import common_pb2
from authz_server.storage.redis import keys
from authz_server.storage.sql.tables import AuthorizationRow
from tests import factories
from tests.harness import lose_redis, new_id
from tests.test_authorization_rules import (
    COLLECTOR,
    HOSPITAL,
    authorize_request,
    family,
    figures,
    register_merchants,
)


def _flush_and_reconcile(harness) -> None:
    lose_redis(harness)


def test_premium_retried_after_redis_loss_pays_once(
    harness, registry, relationships, authorizations
) -> None:
    register_merchants(registry)
    people = family(registry, relationships, 50_000)
    request = authorize_request(
        people.beneficiary_id, common_pb2.PURPOSE_RESIDENT_PREMIUM, 10_000, capture=True
    )
    first = authorizations.Authorize(request, metadata=COLLECTOR)
    assert first.status == pb.AUTHORIZATION_STATUS_CAPTURED
    _flush_and_reconcile(harness)
    again = authorizations.Authorize(request, metadata=COLLECTOR)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
    assert figures(relationships, people.relationship_ids[0]) == (40_000, 0, 10_000)


def test_premium_whose_journal_row_was_never_written_pays_once_after_redis_loss(
    harness, registry, relationships, authorizations
) -> None:
    """A process that died just after the capture committed and before the journal row: the
    payment's answer is stored with the capture itself, so a retry after Redis lost the decision
    still gets it, and nothing is paid twice."""
    register_merchants(registry)
    people = family(registry, relationships, 50_000)
    request = authorize_request(
        people.beneficiary_id, common_pb2.PURPOSE_RESIDENT_PREMIUM, 10_000, capture=True
    )
    first = authorizations.Authorize(request, metadata=COLLECTOR)
    assert first.status == pb.AUTHORIZATION_STATUS_CAPTURED

    def forget_journal_row(session) -> None:
        session.execute(
            delete(AuthorizationRow).where(
                AuthorizationRow.authorization_id == first.authorization_id
            )
        )

    harness.app.database.transaction(forget_journal_row)
    _flush_and_reconcile(harness)
    again = authorizations.Authorize(request, metadata=COLLECTOR)
    assert (again.authorization_id, again.status) == (
        first.authorization_id,
        pb.AUTHORIZATION_STATUS_CAPTURED,
    )
    assert figures(relationships, people.relationship_ids[0]) == (40_000, 0, 10_000)


def test_hold_retried_after_redis_loss_gets_the_original_answer(
    harness, registry, relationships, authorizations
) -> None:
    register_merchants(registry)
    people = family(registry, relationships, 30_000, 20_000)
    request = authorize_request(
        people.beneficiary_id, common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET, 45_000
    )
    first = authorizations.Authorize(request, metadata=HOSPITAL)
    assert len(first.funding) == 2
    _flush_and_reconcile(harness)
    again = authorizations.Authorize(request, metadata=HOSPITAL)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
    # The hold itself survived the loss of Redis: it was put back from SQL, and is capturable.
    assert [figures(relationships, r) for r in people.relationship_ids] == [
        (0, 30_000, 0),
        (5_000, 15_000, 0),
    ]
    captured = authorizations.Capture(
        pb.CaptureRequest(authorization_id=first.authorization_id, idempotency_key=new_id("c")),
        metadata=HOSPITAL,
    )
    assert captured.authorization.status == pb.AUTHORIZATION_STATUS_CAPTURED


def test_capture_found_in_sql_settles_the_hold_instead_of_releasing_it(
    harness, registry, relationships, authorizations
) -> None:
    register_merchants(registry)
    people = family(registry, relationships, 30_000)
    held = authorizations.Authorize(
        authorize_request(people.beneficiary_id, common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET, 8_000),
        metadata=HOSPITAL,
    )
    authorizations.Capture(
        pb.CaptureRequest(authorization_id=held.authorization_id, idempotency_key=new_id("c")),
        metadata=HOSPITAL,
    )
    # An earlier attempt's Redis finish was lost: the hold looks pending again, held again.
    key = keys.authorization(held.authorization_id)
    quota = keys.quota(people.beneficiary_id, people.relationship_ids[0])
    harness.run(harness.client.hset(key, mapping={"s": "PENDING", "ck": ""}))
    harness.run(harness.client.hincrby(quota, "held", 8_000))  # available stays 22,000
    try:
        authorizations.Capture(
            pb.CaptureRequest(authorization_id=held.authorization_id, idempotency_key="other"),
            metadata=HOSPITAL,
        )
        raise AssertionError("a second capture must be refused")
    except Exception as error:  # grpc.RpcError
        assert factories.error_info(error).reason == "ALREADY_CAPTURED"  # type: ignore[arg-type]
    assert figures(relationships, people.relationship_ids[0]) == (22_000, 0, 8_000)


def _stall(harness, authorization_id: str, key: str, seconds_ago: int) -> None:
    """Makes a capture look stuck between its phases since `seconds_ago`."""
    started = int(harness.clock().timestamp() * 1000) - seconds_ago * 1000
    prefix = keys.prefix_of_authorization(authorization_id)
    redis = harness.client
    harness.run(
        redis.hset(
            keys.authorization(authorization_id),
            mapping={"s": "CAPTURING", "ck": key, "cs": started},
        )
    )
    harness.run(redis.zadd(f"{prefix}:capturing", {authorization_id: started}))


def test_a_retry_settles_its_own_stalled_capture(
    harness, registry, relationships, authorizations
) -> None:
    register_merchants(registry)
    people = family(registry, relationships, 30_000)
    held = authorizations.Authorize(
        authorize_request(people.beneficiary_id, common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET, 8_000),
        metadata=HOSPITAL,
    )
    # The first attempt claimed the hold and vanished before writing SQL.
    _stall(harness, held.authorization_id, "till-retry", seconds_ago=120)
    captured = authorizations.Capture(
        pb.CaptureRequest(authorization_id=held.authorization_id, idempotency_key="till-retry"),
        metadata=HOSPITAL,
    )
    assert captured.authorization.captured_amount_fen == 8_000
    assert figures(relationships, people.relationship_ids[0]) == (22_000, 0, 8_000)


def test_the_sweeper_finishes_a_stalled_capture_sql_has(
    harness, registry, relationships, authorizations
) -> None:
    import time

    register_merchants(registry)
    people = family(registry, relationships, 30_000)
    held = authorizations.Authorize(
        authorize_request(people.beneficiary_id, common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET, 8_000),
        metadata=HOSPITAL,
    )
    authorizations.Capture(
        pb.CaptureRequest(authorization_id=held.authorization_id, idempotency_key="swept"),
        metadata=HOSPITAL,
    )
    # SQL has the capture; Redis lost the finish: still CAPTURING, the money still held.
    quota = keys.quota(people.beneficiary_id, people.relationship_ids[0])
    harness.run(harness.client.hincrby(quota, "held", 8_000))
    _stall(harness, held.authorization_id, "swept", seconds_ago=120)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        shown = factories.relationship(relationships, people.relationship_ids[0])
        if (shown.available_fen, shown.held_fen) == (22_000, 0):
            break
        time.sleep(0.2)
    assert figures(relationships, people.relationship_ids[0]) == (22_000, 0, 8_000)
    answer = authorizations.GetAuthorization(
        pb.GetAuthorizationRequest(authorization_id=held.authorization_id), metadata=HOSPITAL
    )
    assert answer.authorization.status == pb.AUTHORIZATION_STATUS_CAPTURED
