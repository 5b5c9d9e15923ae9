"""AuditService.ListPersonAccess on the session's service (SQLite or PostgreSQL): exactly the
calls made, paged, only for admin, with its arguments checked."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from authz_server.generated.medwallet.v1 import audit_pb2, audit_pb2_grpc, registry_pb2
from tests import factories
from tests.harness import ADMIN, APP, bearer, new_id


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def request(person: str, start: datetime, end: datetime, **fields: object) -> object:
    return audit_pb2.ListPersonAccessRequest(
        person_id=person, start_time=stamp(start), end_time=stamp(end), **fields
    )


def test_exactly_the_calls_made_paged(channel: grpc.Channel, registry) -> None:
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    person = factories.resident(registry)
    start = datetime.now(UTC)
    for _ in range(5):
        registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id=person), metadata=ADMIN
        )
    with pytest.raises(grpc.RpcError):
        registry.GetParticipant(
            registry_pb2.GetParticipantRequest(participant_id=person), metadata=APP
        )
    end = datetime.now(UTC) + timedelta(milliseconds=1)
    records: list[audit_pb2.AccessRecord] = []
    deadline = time.monotonic() + 10
    while len(records) < 6 and time.monotonic() < deadline:
        time.sleep(0.2)
        records, token = [], ""
        while True:
            page = audit.ListPersonAccess(
                request(person, start, end, page_size=2, page_token=token), metadata=ADMIN
            )
            assert len(page.records) <= 2
            records += page.records
            token = page.next_page_token
            if not token:
                break
    assert [(r.principal_kind, r.principal_id, r.outcome) for r in records] == [
        ("admin", "", "OK")
    ] * 5 + [("channel", "APP", "PermissionDenied")]
    assert all(r.rpc == "medwallet.v1.RegistryService/GetParticipant" for r in records)
    assert all(r.credential.startswith("token:") for r in records)
    times = [r.occurred_at.ToDatetime(tzinfo=UTC) for r in records]
    assert times == sorted(times) and start <= times[0] and times[-1] < end


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"person_id": ""}, "person_id"),
        ({"end": -1}, "end_time"),
        ({"page_size": 1001}, "page_size"),
        ({"page_token": "not-a-token"}, "page_token"),
    ],
)
def test_arguments_are_checked(channel: grpc.Channel, fields: dict[str, object], field: str):
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    now = datetime.now(UTC)
    end = now + timedelta(hours=float(fields.pop("end", 1)))  # type: ignore[arg-type]
    person = str(fields.pop("person_id", "someone"))
    with pytest.raises(grpc.RpcError) as refused:
        audit.ListPersonAccess(request(person, now, end, **fields), metadata=ADMIN)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert factories.error_info(refused.value).metadata["field"] == field


def test_only_admin_may_ask(channel: grpc.Channel) -> None:
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    now = datetime.now(UTC)
    for metadata in (APP, bearer("test-merchant-a")):
        with pytest.raises(grpc.RpcError) as refused:
            audit.ListPersonAccess(
                request("someone", now, now + timedelta(hours=1)), metadata=metadata
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_record_sql_refuses_does_not_hold_the_trail_back(harness, channel) -> None:
    """A batch SQL refuses is written row by row: the good records go in, the bad one is
    dropped and counted (the fuzz test found ids with NUL bytes that PostgreSQL refuses; those
    are no longer recorded, but any other refusal must not block the trail for ever)."""
    from authz_server.observability import metrics
    from authz_server.service.audit_trail import AuditRecord

    person = new_id("audited")
    at = datetime.now(UTC)

    def record(kind: object) -> AuditRecord:
        return AuditRecord(at, person, kind, "", "token:t", "rpc", "", "", "OK")  # type: ignore[arg-type]

    dropped = metrics.audit_dropped._value.get()
    harness.app.audit.record([record("admin"), record(None), record("admin")])
    harness.run(harness.app.audit.flush())
    # (a ledger writer process's count comes forwarded within a second or so)
    deadline = time.monotonic() + 10
    while metrics.audit_dropped._value.get() == dropped and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metrics.audit_dropped._value.get() == dropped + 1
    page = audit_pb2_grpc.AuditServiceStub(channel).ListPersonAccess(
        request(person, at - timedelta(seconds=1), at + timedelta(seconds=1)), metadata=ADMIN
    )
    assert len(page.records) == 2
