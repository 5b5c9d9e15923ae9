"""A hold whose Authorize never committed its journal row, the till having given up, held the
family's money in Redis until it expired (a day for a medical hold), other payments declined
INSUFFICIENT_QUOTA, SQL knowing nothing; no reconcile freed it (a restore keeps open holds).
Now the rolling reconcile releases it once MEDWALLET_ABANDONED_HOLD_SECONDS have passed, SQL's
unique (merchant, idempotency key) deciding: a DECLINED HOLD_ABANDONED row under its key first
(runtime/release_abandoned_holds.py).

The fault is made for real: the Authorize's script is held back on the wire (tests/held_proxy.py)
past the service's Redis timeout, so the call answers UNAVAILABLE, and reaches Redis after: the
hold is placed, and nothing journals it (the reply lost after the script ran)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from authz_server.domain.abandoned_holds import (
    DEFAULT_ABANDONED_HOLD_SECONDS,
    MIN_ABANDONED_HOLD_SECONDS,
    HoldInRedis,
    abandoned,
    checked_abandoned_hold_seconds,
    unconfirmed_for_long,
)
from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.settings import Settings
from authz_server.storage.redis import keys
from authz_server.storage.redis.script_io import Authorize
from authz_server.storage.sql.tables import AuthorizationRow
from tests.harness import Harness
from tests.held_proxy import HeldProxy
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import (
    APPROVED,
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize_request,
    family,
    get,
    refused,
    wait_for,
)
from tests.test_live_reconcile import redis_agrees_with_sql
from tests.test_redis_loss import served_stubs

G = DEFAULT_ABANDONED_HOLD_SECONDS
HOSPITAL_ID = "rules-hospital"
HOLD_ABANDONED = pb.DECLINE_REASON_HOLD_ABANDONED


def released_count() -> float:
    return REGISTRY.get_sample_value("medwallet_abandoned_holds_released_total") or 0.0


def pages_run() -> float:
    return REGISTRY.get_sample_value("medwallet_reconcile_pages_total") or 0.0


def behind_a_proxy(directory: Path, **settings: Any) -> Iterator[tuple[Harness, HeldProxy]]:
    """A server of its own whose Redis is reached through a proxy that can hold the authorize
    script back on the wire (`proxy.holding`), for a module fixture."""
    (directory / "service").mkdir()
    upstream = EmbeddedRedis(directory / "upstream-redis", persistent=False)
    proxy = HeldProxy(upstream.start(), Authorize.SCRIPT.sha.encode())
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TEST_REDIS_URL", proxy.url)
            harness = Harness(directory / "service", **settings)
        try:
            yield harness, proxy
        finally:
            harness.close()
    finally:
        proxy.close()
        upstream.stop()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, HeldProxy]]:
    """Its rolling reconcile on, fast (a pass over the module's few quotas every few ms): the
    test moves the server's clock past the grace and watches the pages release the hold."""
    yield from behind_a_proxy(
        tmp_path_factory.mktemp("abandoned-holds"), reconcile_quotas_per_second=5_000
    )


@pytest.fixture(scope="module")
def stubs(proxied: tuple[Harness, HeldProxy]) -> Iterator[Any]:
    yield from served_stubs(proxied[0])


def delivered_late(
    harness: Harness, proxy: HeldProxy, authorizations: Any, requests: list[pb.AuthorizeRequest]
) -> list[str]:
    """Sends the Authorizes at once with their script held on the wire past the service's Redis
    timeout (each call answers UNAVAILABLE), then lets it reach Redis: each places its hold, never
    journaled. Returns the authorization ids Redis decided, in the requests' order."""
    codes: list[Any] = []

    def call(request: pb.AuthorizeRequest) -> None:
        try:
            authorizations.Authorize(request, metadata=HOSPITAL, timeout=10)
            codes.append("answered")
        except grpc.RpcError as error:
            codes.append(error.code())

    proxy.holding = True
    try:
        tills = [threading.Thread(target=call, args=(request,)) for request in requests]
        for till in tills:
            till.start()
        for till in tills:
            till.join(30)
    finally:
        proxy.holding = False
        proxy.release()
    assert codes == [grpc.StatusCode.UNAVAILABLE] * len(requests), codes
    wait_for(lambda: harness.app.guardian.ready, seconds=10)
    client = harness.admin()
    try:
        decided = [
            client.hget(keys.idempotency(r.beneficiary_id, HOSPITAL_ID, r.idempotency_key), "a")
            for r in requests
        ]
        # A rolling page the held link failed keeps the turn for TURN_WHILE_RUNNING_SECONDS:
        # let the next one start at once.
        client.delete(keys.RECONCILE_TURN)
    finally:
        client.close()
    assert all(isinstance(each, bytes) for each in decided), "a held script did not reach Redis"
    return [each.decode() for each in decided if isinstance(each, bytes)]


def key_row(harness: Harness, idempotency_key: str) -> AuthorizationRow | None:
    """The journal's row for the hospital's key, if any."""
    return harness.app.database.transaction(
        lambda session: session.scalars(
            select(AuthorizationRow).where(
                AuthorizationRow.merchant_id == HOSPITAL_ID,
                AuthorizationRow.idempotency_key == idempotency_key,
            )
        ).one_or_none()
    )


def test_a_hold_never_journaled_is_released_after_the_grace_and_its_retry_told_so(
    proxied: tuple[Harness, HeldProxy], stubs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    harness, proxy = proxied
    registry, relationships, authorizations, _ = stubs
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    request = authorize_request(fam.beneficiary_id, MEDICAL, 12_000)
    (held,) = delivered_late(harness, proxy, authorizations, [request])
    # The fault: the family's money is held, SQL knows nothing, and it lasts.
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
    assert key_row(harness, request.idempotency_key) is None
    pages = pages_run()
    wait_for(lambda: pages_run() > pages + 20, seconds=10)  # passes over it: younger than G
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 12_000)
    other = authorize_request(fam.beneficiary_id, MEDICAL, 10_000)
    assert authorizations.Authorize(other, metadata=HOSPITAL).decision == DECLINED

    released_before = released_count()
    harness.clock.advance(G + 1)
    wait_for(lambda: released_count() > released_before, seconds=10)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (20_000, 0)
    row = key_row(harness, request.idempotency_key)
    assert row is not None and row.authorization_id != held
    assert (row.decision, row.decline_reason, row.approved_fen, row.expires_at) == (
        "DECLINED", "HOLD_ABANDONED", 0, None,
    )  # fmt: skip
    assert any(
        held in record.getMessage() and row.authorization_id in record.getMessage()
        for record in caplog.records
        if record.levelname == "WARNING"
    )

    # The till comes back with the same request and key: told of the decline, nothing held.
    retry = authorizations.Authorize(request, metadata=HOSPITAL)
    assert (retry.decision, retry.decline_reason) == (DECLINED, HOLD_ABANDONED)
    assert (retry.authorization_id, retry.approved_amount_fen) == (row.authorization_id, 0)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (20_000, 0)
    shown = get(authorizations, HOSPITAL, retry.authorization_id)
    assert (shown.status, shown.approved_amount_fen) == (pb.AUTHORIZATION_STATUS_DECLINED, 0)
    # Another request under the key is what it always was: the key reused.
    refused(
        lambda: authorizations.Authorize(
            authorize_request(
                fam.beneficiary_id, MEDICAL, 500, idempotency_key=request.idempotency_key
            ),
            metadata=HOSPITAL,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
    # And the money it held pays again (a new payment: a new key).
    again = authorize_request(fam.beneficiary_id, MEDICAL, 10_000)
    assert authorizations.Authorize(again, metadata=HOSPITAL).decision == APPROVED


def test_a_journaled_hold_of_any_age_and_a_hold_without_its_key_are_never_released(
    proxied: tuple[Harness, HeldProxy], stubs: Any
) -> None:
    harness, proxy = proxied
    registry, relationships, authorizations, _ = stubs
    journaled = family(registry, relationships, 20_000)
    answered = authorizations.Authorize(
        authorize_request(journaled.beneficiary_id, MEDICAL, 7_000), metadata=HOSPITAL
    )
    assert answered.decision == APPROVED
    keyless = family(registry, relationships, 20_000)
    (held,) = delivered_late(
        harness, proxy, authorizations, [authorize_request(keyless.beneficiary_id, MEDICAL, 3_000)]
    )
    client = harness.admin()
    try:  # as a hold placed before holds kept their key
        assert client.hdel(keys.authorization(held), "ik") == 1
    finally:
        client.close()
    released_before = released_count()
    harness.clock.advance(6 * 3_600)  # hours past the grace, within the day a hold lasts
    pages = pages_run()
    wait_for(lambda: pages_run() > pages + 20, seconds=10)
    assert released_count() == released_before
    (journaled_quota,) = journaled.relationship_ids
    assert hot_figures(harness, journaled.beneficiary_id, journaled_quota) == (13_000, 7_000)
    (keyless_quota,) = keyless.relationship_ids
    assert hot_figures(harness, keyless.beneficiary_id, keyless_quota) == (17_000, 3_000)


def test_the_rule_takes_only_old_pending_keyed_holds_sql_has_no_row_of() -> None:
    now_ms, grace = 10_000_000, 300

    def hold(name: str, **fields: Any) -> HoldInRedis:
        values: dict[str, Any] = {
            "authorization_id": name, "merchant_id": "m", "beneficiary_id": "b",
            "purpose": "MEDICAL_OUT_OF_POCKET", "status": "PENDING", "approved_fen": 100,
            "created_ms": now_ms - grace * 1000 - 1, "asked_again_ms": 0,
            "expires_ms": now_ms + 1,
            "idempotency_key": "k", "one_step": False, "put_back": False, **fields,
        }  # fmt: skip
        return HoldInRedis(**values)

    holds = [
        hold("old"),
        hold("journaled"),
        hold("young", created_ms=now_ms - grace * 1000 + 1),
        hold("asked-again", asked_again_ms=now_ms - grace * 1000 + 1),
        hold("capturing", status="CAPTURING"),
        hold("captured", status="CAPTURED"),
        hold("due", expires_ms=now_ms),
        hold("keyless", idempotency_key=""),
        hold("one-step", one_step=True),
        hold("put-back", put_back=True),
    ]
    candidates = unconfirmed_for_long(holds, now_ms, grace)
    assert [h.authorization_id for h in candidates] == ["old", "journaled"]
    assert [h.authorization_id for h in abandoned(candidates, {"journaled"})] == ["old"]


@pytest.mark.parametrize("seconds", [1, 60, MIN_ABANDONED_HOLD_SECONDS - 1])
def test_a_grace_within_the_late_journal_window_is_refused_naming_the_setting(
    seconds: int,
) -> None:
    with pytest.raises(ValueError, match="MEDWALLET_ABANDONED_HOLD_SECONDS"):
        checked_abandoned_hold_seconds(seconds)
    assert checked_abandoned_hold_seconds(MIN_ABANDONED_HOLD_SECONDS) == MIN_ABANDONED_HOLD_SECONDS
    read = Settings.from_environment({"MEDWALLET_ABANDONED_HOLD_SECONDS": str(seconds)})
    assert read.abandoned_hold_seconds == seconds
    assert Settings.from_environment({}).abandoned_hold_seconds == 300
    assert checked_abandoned_hold_seconds(0) == 0  # off (test_abandoned_holds_off.py)
