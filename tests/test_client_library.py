"""The client library against the real service: typed results and enums, typed errors, the
channel's retry policy, and idempotent resends -- a call whose answer is lost with a dropped
connection is resent with the same key and charges once."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime

import grpc
import pytest

from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    common_pb2,
    registry_pb2,
)
from clients import (
    NO_RETRIES,
    AuthorizationLine,
    AuthorizationStatus,
    CatalogItem,
    Channel,
    DeadlineExceededError,
    Decision,
    DeclineReason,
    DissolutionReason,
    ErrorReason,
    FailedPreconditionError,
    IdempotencyKeyReusedError,
    InsuranceEventType,
    InvalidArgumentError,
    ItemCategory,
    MedWalletClient,
    Merchant,
    MerchantKind,
    NotFoundError,
    ParticipantStatus,
    Party,
    PermissionDeniedError,
    Purpose,
    Relation,
    RelationshipStatus,
    RetryPolicy,
    Scheme,
    TerminationReason,
    UnauthenticatedError,
    UnavailableError,
    fen,
    model,
    new_idempotency_key,
    yuan,
)
from clients.channel import Keepalive, channel_options, service_config
from tests.harness import Harness, new_id

# --- a TCP proxy that loses answers --------------------------------------------------------------

HEADERS_FRAME = 0x1


class LossyProxy:
    """A TCP proxy on 127.0.0.1 in front of the server that loses answers. While `drops` > 0,
    the next answer to start (the server's first HEADERS frame on a stream, sent after the
    handler finished) is lost: the proxy closes that connection instead of forwarding it (with
    `stall`, it keeps the connection open and forwards nothing more on it). The request itself was
    forwarded whole, so it was served; only its answer is lost. Records the bytes each
    connection carried to the server."""

    def __init__(self, upstream: str, drops: int = 0, stall: bool = False) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.drops = drops
        self.stall = stall
        self.dropped = 0
        self.sent: list[bytes] = []
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def connections(self) -> int:
        with self.lock:
            return len(self.sent)

    def carried(self, text: str) -> list[bool]:
        """For each connection: did the bytes it carried to the server contain `text`?"""
        with self.lock:
            return [text.encode() in sent for sent in self.sent]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                index = len(self.sent)
                self.sent.append(b"")
                self.sockets += [client, server]
            threading.Thread(target=self._up, args=(client, server, index), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, index: int) -> None:
        try:
            while data := client.recv(65536):
                with self.lock:
                    self.sent[index] += data
                server.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def _lose_next(self) -> bool:
        with self.lock:
            lose = self.drops > 0
            self.drops -= int(lose)
            self.dropped += int(lose)
            return lose

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        """Forwards the server's HTTP/2 frames one by one (9-byte header, then the payload)."""
        buffer = b""
        answered: set[int] = set()
        stalled = False
        try:
            while data := server.recv(65536):
                buffer += data
                while len(buffer) >= 9:
                    size = 9 + int.from_bytes(buffer[:3], "big")
                    if len(buffer) < size:
                        break
                    frame, buffer = buffer[:size], buffer[size:]
                    stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                    if frame[3] == HEADERS_FRAME and stream and stream not in answered:
                        answered.add(stream)
                        if self._lose_next():
                            if not self.stall:
                                _close(client, server)
                                return
                            stalled = True
                    if not stalled:
                        client.sendall(frame)
        except OSError:
            pass
        _close(client, server)

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            _close(*self.sockets)


def _close(*sockets: socket.socket) -> None:
    for opened in sockets:
        with contextlib.suppress(OSError):
            opened.shutdown(socket.SHUT_RDWR)
        opened.close()


@pytest.fixture
def proxies(harness: Harness) -> Iterator[list[LossyProxy]]:
    made: list[LossyProxy] = []
    yield made
    for proxy in made:
        proxy.close()


# --- setup through the client itself -------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(harness: Harness) -> Iterator[MedWalletClient]:
    with MedWalletClient(harness.address, "test-admin") as client:
        yield client


@pytest.fixture(scope="module")
def app(admin: MedWalletClient) -> MedWalletClient:
    return admin.with_token("test-app")


def family(
    admin: MedWalletClient, app: MedWalletClient, quota_fen: int, balance_fen: int = 1_000_000
) -> tuple[str, str, str]:
    """An employee holder sharing `quota_fen` with a resident parent: (holder, parent, rel)."""
    holder, parent = new_id("emp"), new_id("res")
    admin.upsert_participant(holder, Scheme.EMPLOYEE, "110100")
    admin.upsert_participant(parent, Scheme.RESIDENT, "440300")
    admin.credit_personal_account(holder, balance_fen)
    relationship = app.propose_relationship(holder, parent, Relation.PARENT)
    app.consent_relationship(relationship.relationship_id, Party.HOLDER)
    app.consent_relationship(relationship.relationship_id, Party.BENEFICIARY)
    if quota_fen:
        app.allocate_quota(relationship.relationship_id, quota_fen)
    return holder, parent, relationship.relationship_id


def hospital(admin: MedWalletClient) -> None:
    admin.upsert_merchant(Merchant("merchant-a", MerchantKind.MEDICAL_INSTITUTION, "440300"))


def pharmacy(admin: MedWalletClient) -> None:
    admin.upsert_merchant(Merchant("merchant-b", MerchantKind.RETAIL_PHARMACY, "440300"))


def quota(app: MedWalletClient, relationship_id: str) -> tuple[int, int, int]:
    shown = app.get_relationship(relationship_id)
    return shown.available_fen, shown.held_fen, shown.spent_fen


# --- the model -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "proto", "prefix"),
    [
        (model.Decision, authorization_pb2.Decision, "DECISION_"),
        (model.DeclineReason, authorization_pb2.DeclineReason, "DECLINE_REASON_"),
        (model.AuthorizationStatus, authorization_pb2.AuthorizationStatus, "AUTHORIZATION_STATUS_"),
        (model.Purpose, common_pb2.Purpose, "PURPOSE_"),
        (model.Scheme, common_pb2.Scheme, "SCHEME_"),
        (model.ParticipantStatus, common_pb2.ParticipantStatus, "PARTICIPANT_STATUS_"),
        (model.MerchantKind, common_pb2.MerchantKind, "MERCHANT_KIND_"),
        (model.ItemCategory, common_pb2.ItemCategory, "ITEM_CATEGORY_"),
        (model.Relation, common_pb2.Relation, "RELATION_"),
        (model.Party, common_pb2.Party, "PARTY_"),
        (model.RelationshipStatus, common_pb2.RelationshipStatus, "RELATIONSHIP_STATUS_"),
        (model.DissolutionReason, common_pb2.DissolutionReason, "DISSOLUTION_REASON_"),
        (model.Channel, common_pb2.Channel, "CHANNEL_"),
        (model.InsuranceEventType, registry_pb2.InsuranceEventType, "INSURANCE_EVENT_TYPE_"),
        (model.TerminationReason, registry_pb2.TerminationReason, "TERMINATION_REASON_"),
    ],
)
def test_every_enum_mirrors_the_contract(kind: type, proto: object, prefix: str) -> None:
    values = proto.DESCRIPTOR.values  # type: ignore[attr-defined]
    expected = {value.name.removeprefix(prefix): value.number for value in values}
    assert {member.name: member.value for member in kind} == expected


def test_money_is_int_fen() -> None:
    assert fen("12.5") == 1250
    assert fen("0.01") == 1
    assert fen(3) == 300
    assert yuan(123456) == "1,234.56"
    assert yuan(-5) == "-0.05"
    with pytest.raises(TypeError):
        fen(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fen("1.005")
    with pytest.raises(TypeError):
        AuthorizationLine("drug", 1, 12.5)  # type: ignore[arg-type]
    key = new_idempotency_key("till-")
    assert key.startswith("till-") and len(key) == 37 and key != new_idempotency_key("till-")


def test_service_config_retries_unavailable_only() -> None:
    config = json.loads(service_config(RetryPolicy()))
    retried, not_retried = config["methodConfig"]
    assert {name["service"] for name in retried["name"]} == {
        "medwallet.v1.AuthorizationService",
        "medwallet.v1.RelationshipService",
        "medwallet.v1.RegistryService",
        "medwallet.v1.SettlementService",  # CloseMonth again answers the stored report
    }
    assert retried["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.100s",
        "maxBackoff": "2.000s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert not_retried == {
        "name": [
            {"service": "medwallet.v1.RelationshipService", "method": "ProposeRelationship"},
            # harmless repeats that answer differently (returned_fen 0): see channel.py
            {"service": "medwallet.v1.RelationshipService", "method": "DissolveRelationship"},
            {"service": "medwallet.v1.RegistryService", "method": "ReportInsuranceEvent"},
        ]
    }
    assert "retryPolicy" not in json.loads(service_config(NO_RETRIES))["methodConfig"][0]
    options = dict(channel_options(RetryPolicy(), Keepalive()))
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.keepalive_time_ms"] == 310_000
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=6)


# --- typed calls ---------------------------------------------------------------------------------


def test_pharmacy_basket_gives_typed_results(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient
) -> None:
    _, parent, relationship_id = family(admin, app, quota_fen=10_000)
    drug, cream = new_id("drug"), new_id("cream")
    upserted = admin.upsert_catalog_items(
        [
            CatalogItem(drug, ItemCategory.DRUG, eligible=True, name="阿莫西林"),
            CatalogItem(cream, ItemCategory.CONSUMABLE, eligible=False),
        ]
    )
    assert upserted == 2
    pharmacy(admin)
    with MedWalletClient(harness.address, "test-merchant-b") as till:
        result = till.authorize(
            parent,
            Purpose.PHARMACY,
            lines=[AuthorizationLine(drug, 2, 4_700), AuthorizationLine(cream, 1, 8_800)],
            allow_partial=True,
        )
        assert result.decision is Decision.PARTIALLY_APPROVED
        assert result.approved and result.decline_reason is None
        assert result.status is AuthorizationStatus.PENDING
        assert result.approved_amount_fen == 4_700
        lines = [
            (line.item_code, line.approved, line.decline_reason) for line in result.line_results
        ]
        assert lines == [(drug, True, None), (cream, False, DeclineReason.ITEM_NOT_ELIGIBLE)]
        assert result.funding == (model.FundingPart(relationship_id, 4_700),)
        assert result.remaining_quota_fen == 5_300
        assert isinstance(result.expires_at, datetime) and result.expires_at.tzinfo is not None
        assert result.idempotency_key.startswith("auth-")

        captured = till.capture(result.authorization_id)
        assert captured.status is AuthorizationStatus.CAPTURED
        assert captured.purpose is Purpose.PHARMACY
        assert (captured.captured_amount_fen, captured.refundable_fen) == (4_700, 4_700)
        shown = till.get_authorization(result.authorization_id)
        assert shown.created_at is not None and shown.expires_at is not None
        # (Capture's answer leaves the timestamps unset; compare the rest.)
        assert replace(shown, created_at=None, expires_at=None) == replace(
            captured, created_at=None, expires_at=None
        )

        declined = till.authorize(parent, Purpose.PHARMACY, lines=[AuthorizationLine(cream, 1, 10)])
        assert declined.decision is Decision.DECLINED
        assert declined.decline_reason is DeclineReason.ITEM_NOT_ELIGIBLE
        assert not declined.approved
    assert quota(app, relationship_id) == (5_300, 0, 4_700)


def test_registry_and_relationship_calls_are_typed(
    admin: MedWalletClient, app: MedWalletClient
) -> None:
    holder, parent = new_id("emp"), new_id("res")
    created = admin.upsert_participant(holder, Scheme.EMPLOYEE, "110100")
    assert created.created and created.participant.scheme is Scheme.EMPLOYEE
    assert created.participant.status is ParticipantStatus.ACTIVE
    assert not admin.upsert_participant(holder, Scheme.EMPLOYEE, "110100").created
    admin.upsert_participant(parent, Scheme.RESIDENT, "440300")
    credit = admin.prepare_credit_personal_account(holder, 50_000)
    assert credit.run().balance_fen == 50_000
    assert credit.run().balance_fen == 50_000  # the same operation again: credited once
    assert admin.get_participant(holder).balance_fen == 50_000

    proposed = app.propose_relationship(holder, parent, Relation.PARENT)
    assert proposed.status is RelationshipStatus.PENDING_CONSENT
    assert proposed.created_channel is Channel.APP and proposed.activated_at is None
    app.consent_relationship(proposed.relationship_id, Party.HOLDER)
    active = app.consent_relationship(proposed.relationship_id, Party.BENEFICIARY)
    assert active.status is RelationshipStatus.ACTIVE and active.activated_at is not None
    moved = app.allocate_quota(proposed.relationship_id, 30_000)
    assert (moved.holder_balance_fen, moved.relationship.available_fen) == (20_000, 30_000)
    released = app.release_quota(proposed.relationship_id, 10_000)
    assert (released.holder_balance_fen, released.relationship.allocated_fen) == (30_000, 20_000)

    page = app.list_relationships(holder_id=holder, page_size=1)
    assert [r.relationship_id for r in page.relationships] == [proposed.relationship_id]
    assert [r.relationship_id for r in app.iter_relationships(beneficiary_id=parent)] == [
        proposed.relationship_id
    ]
    with pytest.raises(ValueError):
        app.list_relationships()

    dissolved = app.dissolve_relationship(proposed.relationship_id, Party.BENEFICIARY)
    assert dissolved.returned_fen == 20_000
    assert dissolved.relationship.status is RelationshipStatus.DISSOLVED
    assert dissolved.relationship.dissolution_reason is DissolutionReason.VOLUNTARY
    assert admin.get_participant(holder).balance_fen == 50_000

    event = admin.report_insurance_event(
        parent,
        InsuranceEventType.TERMINATED,
        termination_reason=TerminationReason.DEATH,
    )
    assert event.participant.status is ParticipantStatus.TERMINATED
    assert event.dissolved_relationship_ids == ()


def test_errors_are_typed_with_reason_and_field(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient
) -> None:
    holder, parent, _ = family(admin, app, quota_fen=10_000)
    hospital(admin)
    with pytest.raises(InvalidArgumentError) as invalid:
        admin.upsert_participant("not valid!", Scheme.EMPLOYEE, "110100")
    assert invalid.value.field == "participant_id"
    assert invalid.value.reason == ErrorReason.INVALID_ARGUMENT
    assert invalid.value.code is grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(FailedPreconditionError) as refused:
        app.propose_relationship(holder, holder, Relation.SPOUSE)
    assert refused.value.reason == ErrorReason.SELF_SHARING and refused.value.field is None
    assert not refused.value.retryable

    with pytest.raises(NotFoundError):
        app.get_relationship(new_id("missing"))
    with pytest.raises(PermissionDeniedError):
        app.get_participant(holder)
    with pytest.raises(UnauthenticatedError):
        app.with_token("no-such-token").get_participant(holder)

    with MedWalletClient(harness.address, "test-merchant-a") as till:
        first = till.authorize(parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=1_000)
        with pytest.raises(IdempotencyKeyReusedError) as reused:
            till.authorize(
                parent,
                Purpose.MEDICAL_OUT_OF_POCKET,
                amount_fen=2_000,
                idempotency_key=first.idempotency_key,
            )
        assert reused.value.reason == ErrorReason.IDEMPOTENCY_KEY_REUSED
        assert reused.value.code is grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(TypeError):
            till.authorize(parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=10.5)  # type: ignore[arg-type]


# --- retries and resends -------------------------------------------------------------------------


def test_call_whose_answer_was_lost_is_retried_with_its_key_and_charges_once(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient, proxies: list[LossyProxy]
) -> None:
    _, parent, relationship_id = family(admin, app, quota_fen=50_000)
    hospital(admin)
    proxy = LossyProxy(harness.address, drops=1)
    proxies.append(proxy)
    with MedWalletClient(proxy.address, "test-merchant-a") as till:
        payment = till.prepare_authorize(parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=30_000)
        result = payment.run()
        # The first attempt was served, its answer lost; gRPC's retry got the original answer.
        assert (proxy.dropped, proxy.connections) == (1, 2)
        assert proxy.carried(payment.idempotency_key) == [True, True]
        assert result.decision is Decision.APPROVED
        assert result.remaining_quota_fen == 20_000
        assert quota(app, relationship_id) == (20_000, 30_000, 0)
        assert payment.run().authorization_id == result.authorization_id

        proxy.drops = 1
        capture = till.prepare_capture(result.authorization_id, 25_000)
        captured = capture.run()
        assert proxy.dropped == 2 and proxy.carried(capture.idempotency_key).count(True) == 2
        assert captured.captured_amount_fen == 25_000
        assert quota(app, relationship_id) == (25_000, 0, 25_000)

        proxy.drops = 1
        refund = till.prepare_refund(result.authorization_id, 5_000)
        refunded = refund.run()
        assert proxy.dropped == 3 and proxy.carried(refund.idempotency_key).count(True) == 2
        assert refunded.authorization.refunded_amount_fen == 5_000
        assert refunded.parts == (model.RefundPart(relationship_id, 5_000, False),)
    assert quota(app, relationship_id) == (30_000, 0, 20_000)


def test_client_resends_the_same_key_after_grpc_retries_are_spent(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient, proxies: list[LossyProxy]
) -> None:
    _, parent, relationship_id = family(admin, app, quota_fen=50_000)
    hospital(admin)
    proxy = LossyProxy(harness.address, drops=3)
    proxies.append(proxy)
    retry = RetryPolicy(max_attempts=2, resends=2, resend_backoff_s=0.05)
    with MedWalletClient(proxy.address, "test-merchant-a", retry=retry) as till:
        result = till.authorize(
            parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=12_000, capture=True
        )
    # 2 gRPC attempts, then a resend of 2 more: four attempts, one key, three answers lost.
    assert (proxy.dropped, proxy.connections) == (3, 4)
    assert proxy.carried(result.idempotency_key) == [True, True, True, True]
    assert result.status is AuthorizationStatus.CAPTURED
    assert quota(app, relationship_id) == (38_000, 0, 12_000)


def test_operation_resumed_with_its_persisted_key_after_a_crash_charges_once(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient, proxies: list[LossyProxy]
) -> None:
    _, parent, relationship_id = family(admin, app, quota_fen=50_000)
    hospital(admin)
    proxy = LossyProxy(harness.address, drops=1)
    proxies.append(proxy)
    with MedWalletClient(proxy.address, "test-merchant-a", retry=NO_RETRIES) as till:
        payment = till.prepare_authorize(parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=20_000)
        journal = payment.idempotency_key  # what the till writes down before sending
        with pytest.raises(UnavailableError) as lost:
            payment.run()
        assert lost.value.retryable
    assert proxy.connections == 1
    assert quota(app, relationship_id) == (30_000, 20_000, 0)  # served, answer lost

    # The till restarts and finishes the same operation with the key from its journal.
    with MedWalletClient(harness.address, "test-merchant-a") as restarted:
        result = restarted.authorize(
            parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=20_000, idempotency_key=journal
        )
        assert result.decision is Decision.APPROVED and result.idempotency_key == journal
        again = restarted.prepare_authorize(
            parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=20_000, idempotency_key=journal
        ).run()
        assert again.authorization_id == result.authorization_id
    assert quota(app, relationship_id) == (30_000, 20_000, 0)


def test_propose_has_no_key_so_it_is_never_retried(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient, proxies: list[LossyProxy]
) -> None:
    holder, parent = new_id("emp"), new_id("res")
    admin.upsert_participant(holder, Scheme.EMPLOYEE, "110100")
    admin.upsert_participant(parent, Scheme.RESIDENT, "440300")
    proxy = LossyProxy(harness.address, drops=1)
    proxies.append(proxy)
    with (
        MedWalletClient(proxy.address, "test-app") as channel_client,
        pytest.raises(UnavailableError),
    ):
        channel_client.propose_relationship(holder, parent, Relation.PARENT)
    assert proxy.connections == 1
    # It was created; look before proposing again.
    assert len(list(app.iter_relationships(holder_id=holder))) == 1


def test_every_call_has_a_deadline(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient, proxies: list[LossyProxy]
) -> None:
    proxy = LossyProxy(harness.address, drops=1, stall=True)
    proxies.append(proxy)
    holder, _, _ = family(admin, app, quota_fen=0)
    with MedWalletClient(proxy.address, "test-admin", timeout=0.3) as slow:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as late:
            slow.get_participant(holder)
        assert 0.25 < time.monotonic() - started < 2
        assert late.value.retryable
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            slow.get_participant(holder, timeout=0.1)
        assert time.monotonic() - started < 1
    assert proxy.connections == 1
