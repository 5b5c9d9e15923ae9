"""A retry after its month was closed and its idempotency record purged (`purge-idempotency`,
run after each close: service/retention.py). A refund's retry is still a retry: the refunds
table keeps each refund's key, so it is answered with the authorization as it is now and
nothing is refunded again (an audit found it refunded a second time: money back to the quota
twice, the merchant charged twice, when the till's retry came minutes after the close)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from authz_server.generated.medwallet.v1 import authorization_pb2
from authz_server.service import retention
from authz_server.service.retention import purge_closed_months
from authz_server.storage.sql.tables import AuthorizationRow
from tests import engine_factories as ef
from tests import factories
from tests.harness import new_id
from tests.test_authorization_rules import (
    CAPTURED,
    MEDICAL,
    authorize,
    capture,
    family,
    refused,
    register_merchants,
)
from tests.test_authorization_rules import HOSPITAL as RULES_HOSPITAL
from tests.test_settlement_races import HOSPITAL, World


def refunded_metric() -> float:
    """medwallet_refunded_amount_fen_total over its labels ("money refunded")."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "medwallet_refunded_amount_fen":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    yield world
    world.close()


def test_a_refund_retried_after_its_month_was_closed_and_purged_refunds_once(
    world: World,
) -> None:
    app = world.harness.app
    world.at(2025, 1, 31, 21)
    world.capture()  # 1,000 fen captured on 31 January
    request = authorization_pb2.RefundRequest(
        authorization_id=world.hold.authorization_id,
        amount_fen=400,
        idempotency_key=new_id("refund"),
    )
    world.at(2025, 1, 31, 23, 59, 59)
    counted = refunded_metric()
    first = world.authorizations.Refund(request, metadata=HOSPITAL)
    assert first.authorization.refunded_amount_fen == 400

    # The operator closes January just after midnight and purges, as the README says to.
    world.at(2025, 2, 1, 0, 5)
    assert world.settled("2025-01") == (1_000, 400)
    purged = world.harness.run(purge_closed_months(app.database, app.pipelined_redis))
    assert purged.through_month == "2025-01" and purged.sql_records >= 1

    # The till never saw the first answer (a timeout, a crash) and retries with the same key.
    world.at(2025, 2, 1, 0, 10)
    again = world.authorizations.Refund(request, metadata=HOSPITAL)
    # refunded 400, once (the settled authorization was purged from Redis too: its times now
    # come from SQL's journal, to the millisecond as Redis had them)
    assert again.authorization == first.authorization
    assert list(again.parts) == []  # where it went was in the purged record
    assert world.in_ledger("REFUND_TO_QUOTA", "REFUND_TO_ACCOUNT") == 400
    assert refunded_metric() - counted == 400  # counted as a replay, not as money refunded

    # The same key for another amount is another request: refused, nothing refunded.
    other = authorization_pb2.RefundRequest()
    other.CopyFrom(request)
    other.amount_fen = 300
    with pytest.raises(grpc.RpcError) as refused:
        world.authorizations.Refund(other, metadata=HOSPITAL)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert factories.error_info(refused.value).reason == "IDEMPOTENCY_KEY_REUSED"
    assert world.in_ledger("REFUND_TO_QUOTA", "REFUND_TO_ACCOUNT") == 400
    # February's settlement has no refund of it either.
    world.at(2025, 3, 1, 0, 5)
    assert world.settled("2025-02") == (0, 0)


def test_a_capture_retried_after_its_month_was_closed_and_purged_gets_the_authorization(
    world: World,
) -> None:
    """Its record and the authorization's Redis hash are gone: SQL's capture row has its key,
    so the retry is answered with the authorization as it is now (before: ALREADY_CAPTURED, an
    error for a capture that went through, and a till might take the money another way)."""
    app = world.harness.app
    world.at(2025, 1, 31, 21)
    request = authorization_pb2.CaptureRequest(
        authorization_id=world.hold.authorization_id, idempotency_key=new_id("capture")
    )
    first = world.authorizations.Capture(request, metadata=HOSPITAL)
    assert first.authorization.captured_amount_fen == 1_000

    world.at(2025, 2, 1, 0, 5)
    assert world.settled("2025-01") == (1_000, 0)
    world.harness.run(purge_closed_months(app.database, app.pipelined_redis))

    world.at(2025, 2, 1, 0, 10)
    again = world.authorizations.Capture(request, metadata=HOSPITAL)
    assert again.authorization == first.authorization
    assert world.in_ledger("CAPTURE") == 1_000

    other = authorization_pb2.CaptureRequest()
    other.CopyFrom(request)
    other.amount_fen = 500  # another request under the key
    with pytest.raises(grpc.RpcError) as refused:
        world.authorizations.Capture(other, metadata=HOSPITAL)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert world.in_ledger("CAPTURE") == 1_000


def test_a_capture_keyed_like_its_authorize_retried_after_the_purge_gets_the_authorization(
    world: World,
) -> None:
    """A till that keys both calls of a sale by its order id (the keys live in different
    scopes): its capture's retry after the purge was refused ALREADY_CAPTURED, taken for a
    Capture under a one-step payment's key (an audit finding). A one-step payment is told by
    its answer's record under the merchant's Authorize keys, which the purge keeps."""
    app = world.harness.app
    order = app.database.transaction(
        lambda session: session.get(AuthorizationRow, world.hold.authorization_id).idempotency_key
    )
    world.at(2025, 1, 31, 21)
    request = authorization_pb2.CaptureRequest(
        authorization_id=world.hold.authorization_id, idempotency_key=order
    )
    first = world.authorizations.Capture(request, metadata=HOSPITAL)
    assert first.authorization.captured_amount_fen == 1_000
    assert world.authorizations.Capture(request, metadata=HOSPITAL) == first

    world.at(2025, 2, 1, 0, 5)
    assert world.settled("2025-01") == (1_000, 0)
    world.harness.run(purge_closed_months(app.database, app.pipelined_redis))

    world.at(2025, 2, 1, 0, 10)
    again = world.authorizations.Capture(request, metadata=HOSPITAL)
    assert again.authorization == first.authorization
    assert world.in_ledger("CAPTURE") == 1_000


def test_a_capture_under_a_key_an_earlier_one_step_payment_used_is_answered_after_the_purge(
    world: World,
) -> None:
    """A till may use one key string for a one-step payment (Authorize's scope) and, later, for
    another sale's Capture (Capture's scope): that capture's retry after the purge was refused
    ALREADY_CAPTURED, taken for the one-step payment's (a second audit). The payment's record
    must be this authorization's: its journal row carries the same key."""
    app = world.harness.app
    beneficiary = app.database.transaction(
        lambda session: session.get(AuthorizationRow, world.hold.authorization_id).beneficiary_id
    )
    key = new_id("till")
    world.at(2025, 1, 31, 20, 30)
    one_step = ef.medical(beneficiary, 500, capture=True)
    one_step.idempotency_key = key
    paid = world.authorizations.Authorize(one_step, metadata=HOSPITAL)
    assert paid.status == authorization_pb2.AUTHORIZATION_STATUS_CAPTURED

    world.at(2025, 1, 31, 21)
    request = authorization_pb2.CaptureRequest(
        authorization_id=world.hold.authorization_id, idempotency_key=key
    )
    first = world.authorizations.Capture(request, metadata=HOSPITAL)
    assert first.authorization.captured_amount_fen == 1_000
    assert world.authorizations.Capture(request, metadata=HOSPITAL) == first

    world.at(2025, 2, 1, 0, 5)
    assert world.settled("2025-01") == (1_500, 0)
    world.harness.run(purge_closed_months(app.database, app.pipelined_redis))

    world.at(2025, 2, 1, 0, 10)
    again = world.authorizations.Capture(request, metadata=HOSPITAL)
    assert again.authorization == first.authorization
    assert world.in_ledger("CAPTURE") == 1_500


def test_a_capture_retried_while_the_purge_has_left_its_redis_hash_gets_the_authorization(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge drops SQL's records first, then Redis's settled hashes: a retry in between (or
    after the Redis step failed) finds the hash CAPTURED under its key and no record in SQL. It
    is answered from the capture's row (before: ALREADY_CAPTURED)."""
    app = world.harness.app
    world.at(2025, 1, 31, 21)
    request = authorization_pb2.CaptureRequest(
        authorization_id=world.hold.authorization_id, idempotency_key=new_id("capture")
    )
    first = world.authorizations.Capture(request, metadata=HOSPITAL)
    assert first.authorization.captured_amount_fen == 1_000

    world.at(2025, 2, 1, 0, 5)
    assert world.settled("2025-01") == (1_000, 0)

    async def redis_step_fails(*args: object, **kwargs: object) -> int:
        raise ConnectionError("Redis timed out during the purge's SCAN")

    # SQL's records are deleted (committed), then the Redis step fails: the settled hashes stay
    # until the operator runs purge-idempotency again.
    monkeypatch.setattr(retention, "purge_settled_authorizations_before", redis_step_fails)
    with pytest.raises(ConnectionError):
        world.harness.run(purge_closed_months(app.database, app.pipelined_redis))

    world.at(2025, 2, 1, 0, 10)
    try:
        again = world.authorizations.Capture(request, metadata=HOSPITAL)
    except grpc.RpcError as refused:
        pytest.fail(
            f"the till's retry of a capture that went through was refused: {refused.code()} "
            f"{factories.error_info(refused).reason}"
        )
    for answer in (first, again):
        answer.authorization.ClearField("created_at")
    assert again.authorization == first.authorization
    assert world.in_ledger("CAPTURE") == 1_000


@pytest.mark.parametrize("amount_fen", [0, 5_000], ids=["all", "part"])
def test_a_capture_of_a_one_step_payment_under_its_authorize_key_is_already_captured(
    registry: Any, relationships: Any, authorizations: Any, amount_fen: int
) -> None:
    """A one-step payment's capture row carries its Authorize's key (another scope): a first
    Capture under the same key string (a till keying every call of a sale by its order id) is
    not a retry of it (before this was checked: answered OK as a replay of a capture it never
    made, or IDEMPOTENCY_KEY_REUSED)."""
    register_merchants(registry)
    fam = family(registry, relationships, 20_000)
    key = new_id("sale")
    paid = authorize(
        authorizations, RULES_HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000,
        idempotency_key=key, capture=True,
    )  # fmt: skip
    assert paid.status == CAPTURED
    refused(
        lambda: capture(authorizations, RULES_HOSPITAL, paid.authorization_id, amount_fen, key=key),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CAPTURED",
    )
