"""The audit trail answers "who accessed this person's data between two dates" with exactly the
calls made: across two worker processes and a restart (a clean stop loses nothing), through the
admin RPC and the CLI; purge-audit drops what is past the retention period."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from authz_server.generated.medwallet.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    relationship_pb2,
    relationship_pb2_grpc,
)
from tests import factories
from tests.engine_factories import HOSPITAL, HOSPITAL_TOKEN, medical, merchant
from tests.harness import ADMIN, APP
from tests.operations.server_process import ServerProcess

# Its servers are `serve` processes on SQLite in their data directory whatever TEST_DATABASE_URL
# says (ServerProcess drops DATABASE_URL): the PostgreSQL pass would only run it again on
# SQLite, so it leaves it out.
pytestmark = pytest.mark.backend_neutral

CONNECTIONS = 6  # each its own connection: SO_REUSEPORT spreads them over the two workers
Expected = tuple[str, str, str, str]  # rpc, principal kind, principal id, outcome


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _calls_on(address: str, person: str, relationship_id: str) -> list[Expected]:
    """Reads and a payment about `person` from several connections; what the trail must show."""
    expected: list[Expected] = []
    for _ in range(CONNECTIONS):
        with grpc.insecure_channel(address) as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            relationships = relationship_pb2_grpc.RelationshipServiceStub(channel)
            engine = authorization_pb2_grpc.AuthorizationServiceStub(channel)
            registry.GetParticipant(
                registry_pb2.GetParticipantRequest(participant_id=person), metadata=ADMIN
            )
            expected.append(("RegistryService/GetParticipant", "admin", "", "OK"))
            relationships.GetRelationship(
                relationship_pb2.GetRelationshipRequest(relationship_id=relationship_id),
                metadata=APP,
            )
            expected.append(("RelationshipService/GetRelationship", "channel", "APP", "OK"))
            answer = engine.Authorize(medical(person, 100), metadata=HOSPITAL_TOKEN)
            assert answer.decision == authorization_pb2.DECISION_APPROVED
            expected.append(
                ("AuthorizationService/Authorize", "merchant", HOSPITAL, "OK:DECISION_APPROVED")
            )
            try:  # a merchant may not read the registry: refused, and still recorded
                registry.GetParticipant(
                    registry_pb2.GetParticipantRequest(participant_id=person),
                    metadata=HOSPITAL_TOKEN,
                )
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            expected.append(
                ("RegistryService/GetParticipant", "merchant", HOSPITAL, "PermissionDenied")
            )
    return expected


def _trail(address: str, person: str, start: datetime, end: datetime) -> list[Expected]:
    """Every record of the person in [start, end), page by page (3 a page)."""
    found: list[Expected] = []
    token = ""
    with grpc.insecure_channel(address) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        while True:
            page = audit.ListPersonAccess(
                audit_pb2.ListPersonAccessRequest(
                    person_id=person,
                    start_time=_stamp(start),
                    end_time=_stamp(end),
                    page_size=3,
                    page_token=token,
                ),
                metadata=ADMIN,
                timeout=10,
            )
            for record in page.records:
                assert record.credential.startswith("token:"), record
                rpc = record.rpc.removeprefix("medwallet.v1.")
                found.append((rpc, record.principal_kind, record.principal_id, record.outcome))
            token = page.next_page_token
            if not token:
                return found


def _settled_trail(
    address: str, person: str, start: datetime, end: datetime, count: int
) -> list[Expected]:
    deadline = time.monotonic() + 10
    found = _trail(address, person, start, end)
    while len(found) < count and time.monotonic() < deadline:  # written in batches, off-path
        time.sleep(0.2)
        found = _trail(address, person, start, end)
    return found


def test_the_trail_holds_exactly_the_calls_across_workers_and_a_restart(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, workers=2)
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.address) as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            relationships = relationship_pb2_grpc.RelationshipServiceStub(channel)
            merchant(registry, HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
            person = factories.resident(registry)
            holder = factories.employee(registry, balance_fen=100_000)
            relationship_id = factories.active_relationship(relationships, holder, person, 50_000)
        time.sleep(3)  # the other worker's merchant cache refreshes every 2 s
        since = datetime.now(UTC)  # the setup above is before the window
        expected = _calls_on(server.address, person, relationship_id)
        assert server.stop() == 0  # SIGTERM: a clean stop flushes what is buffered
        server = ServerProcess(tmp_path, workers=2)
        server.wait_serving()
        expected += _calls_on(server.address, person, relationship_id)
        until = datetime.now(UTC)
        found = _settled_trail(server.address, person, since, until, len(expected))
        assert found == expected
        # the setup calls are there too, before the window
        earlier = _trail(server.address, person, datetime(2000, 1, 1, tzinfo=UTC), since)
        assert earlier and all(
            rpc.startswith(("RegistryService/UpsertParticipant", "RelationshipService/"))
            for rpc, *_ in earlier
        ), earlier
    finally:
        server.stop()

    # the CLI answers the same, and purge-audit with 0 days of retention empties the trail
    environment = dict(os.environ, MEDWALLET_DATA_DIR=str(tmp_path / "data"))
    environment.pop("DATABASE_URL", None)
    listed = subprocess.run(
        [sys.executable, "-m", "authz_server.cli", "audit", person, "--from",
         since.isoformat(), "--to", until.isoformat(), "--page-size", "5"],
        env=environment, capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = listed.stdout.strip().splitlines()[1:]
    assert len(lines) == len(expected)
    assert [line.split("\t")[3].removeprefix("medwallet.v1.") for line in lines] == [
        rpc for rpc, *_ in expected
    ]
    purged = subprocess.run(
        [sys.executable, "-m", "authz_server.cli", "purge-audit"],
        env={**environment, "MEDWALLET_AUDIT_RETENTION_DAYS": "0"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "deleted" in purged.stdout and not purged.stdout.startswith("deleted 0 ")
    again = subprocess.run(
        [sys.executable, "-m", "authz_server.cli", "audit", person, "--from",
         since.isoformat(), "--to", until.isoformat()],
        env=environment, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert again.stdout.strip().splitlines()[1:] == []
