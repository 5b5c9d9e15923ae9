"""AuditService handlers (admin principal): who accessed a person's data between two dates."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from authz_server.domain import validation
from authz_server.domain.errors import InvalidArgument
from authz_server.generated.medwallet.v1 import audit_pb2, audit_pb2_grpc
from authz_server.server import convert
from authz_server.server.auth import Authenticator, PrincipalKind
from authz_server.server.errors import mapped
from authz_server.service import audit_trail
from authz_server.storage.sql.database import Database

Context = grpc.aio.ServicerContext[Any, Any]


def access_record(stored: audit_trail.StoredRecord) -> audit_pb2.AccessRecord:
    record = stored.record
    return audit_pb2.AccessRecord(
        occurred_at=convert.timestamp(record.occurred_at),
        principal_kind=record.principal_kind,
        principal_id=record.principal_id,
        credential=record.credential,
        rpc=record.rpc,
        relationship_id=record.relationship_id,
        authorization_id=record.authorization_id,
        outcome=record.outcome,
    )


def _instant(field: str, value: Timestamp) -> datetime:
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as error:
        raise InvalidArgument(field, "not a valid instant") from error


class AuditHandler(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, database: Database, auth: Authenticator) -> None:
        self.database = database
        self.auth = auth

    @mapped
    async def ListPersonAccess(
        self, request: audit_pb2.ListPersonAccessRequest, context: Context
    ) -> audit_pb2.ListPersonAccessResponse:
        self.auth.require(context, PrincipalKind.ADMIN)
        person_id = validation.identifier("person_id", request.person_id)
        for name in ("start_time", "end_time"):
            if not request.HasField(name):
                raise InvalidArgument(name, "is required")
        start = _instant("start_time", request.start_time)
        end = _instant("end_time", request.end_time)
        if end <= start:
            raise InvalidArgument("end_time", "must be after start_time")
        page_size, token = request.page_size, request.page_token
        page, next_token = await self.database.run(
            lambda s: audit_trail.person_access(s, person_id, start, end, page_size, token)
        )
        return audit_pb2.ListPersonAccessResponse(
            records=[access_record(stored) for stored in page], next_page_token=next_token
        )
