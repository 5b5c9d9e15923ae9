"""Records every call that reads or changes a person's relationships, quotas, payments and
refunds in the audit trail: who (the principal the call proved, and its token id or certificate
fingerprint), what (the RPC, the persons, the relationship or authorization), when, and the
outcome. A call that proved no principal (UNAUTHENTICATED) read nothing and is not recorded.

The persons and ids come from the request and the response: fields named participant_id,
holder_id, beneficiary_id, person_id (persons), relationship_id and authorization_id, at any
depth (a listed page of relationships names all their parties). One record per person; a call
naming none (an unknown id) gets one record without a person. Records go to the AuditTrail's
buffer (or the ledger writer's); SQL is written off the call's path.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from authz_server.observability.interceptor import go_code_name
from authz_server.server.auth import Principal, authenticated
from authz_server.server.wrapped_server import Handler, WrappedServer
from authz_server.service.audit_trail import AuditRecord, AuditSink

# Ids as the service issues and accepts them; anything else (a refused call's garbage) names
# no record in SQL, so it is recorded as absent, never stored (PostgreSQL refuses NUL bytes).
RECORDED_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
PERSON_FIELDS = frozenset({"participant_id", "holder_id", "beneficiary_id", "person_id"})
# The services whose every call is about a person's data, and the registry's person calls.
AUDITED_SERVICES = frozenset(
    {
        "medwallet.v1.RelationshipService",
        "medwallet.v1.AuthorizationService",
        "medwallet.v1.AuditService",
    }
)
AUDITED_METHODS = frozenset(
    {
        "medwallet.v1.RegistryService/UpsertParticipant",
        "medwallet.v1.RegistryService/GetParticipant",
        "medwallet.v1.RegistryService/CreditPersonalAccount",
        "medwallet.v1.RegistryService/ReportInsuranceEvent",
    }
)


def audited(full_method: str) -> bool:
    method = full_method.lstrip("/")
    return method.rpartition("/")[0] in AUDITED_SERVICES or method in AUDITED_METHODS


ID_FIELDS = PERSON_FIELDS | {"relationship_id", "authorization_id"}
# messages nested deeper than this are not looked into
MAX_DEPTH = 3


@functools.cache
def _fields_with_ids(descriptor: Descriptor, depth: int) -> tuple[FieldDescriptor, ...]:
    """The fields of a message type that are, or may hold within the depth left, an id the
    trail records, in field-number order (as ListFields gives them): walked per call instead
    of every field of the message (an Authorize's lines hold none)."""
    found = []
    for field in sorted(descriptor.fields, key=lambda f: f.number):
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            entry = field.message_type
            nested = entry is not None and depth < MAX_DEPTH and not entry.GetOptions().map_entry
            wanted = nested and entry is not None and bool(_fields_with_ids(entry, depth + 1))
        else:
            wanted = (
                field.type == FieldDescriptor.TYPE_STRING
                and not field.is_repeated
                and field.name in ID_FIELDS
            )
        if wanted:
            found.append(field)
    return tuple(found)


class _Ids:
    def __init__(self) -> None:
        self.persons: list[str] = []
        self.relationship_id = ""
        self.authorization_id = ""

    def collect(self, message: Message, depth: int = 0) -> None:
        for field in _fields_with_ids(message.DESCRIPTOR, depth):
            value = getattr(message, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if field.is_repeated:
                    for child in value:
                        self.collect(child, depth + 1)
                elif message.HasField(field.name):
                    self.collect(value, depth + 1)
            elif not value or not RECORDED_ID.fullmatch(value):
                continue
            elif field.name in PERSON_FIELDS:
                if value not in self.persons:
                    self.persons.append(value)
            elif field.name == "relationship_id":
                self.relationship_id = self.relationship_id or value
            else:
                self.authorization_id = self.authorization_id or value


def records(
    rpc: str,
    principal: Principal,
    request: Message,
    response: Message | None,
    outcome: str,
    at: datetime,
) -> list[AuditRecord]:
    ids = _Ids()
    ids.collect(request)
    if response is not None:
        ids.collect(response)
    principal_id = principal.merchant_id or (principal.channel.value if principal.channel else "")
    return [
        AuditRecord(
            occurred_at=at,
            person_id=person,
            principal_kind=principal.kind.value,
            principal_id=principal_id,
            credential=principal.credential,
            rpc=rpc,
            relationship_id=ids.relationship_id,
            authorization_id=ids.authorization_id,
            outcome=outcome,
        )
        for person in _persons(ids)
    ]


def _persons(ids: _Ids) -> list[str | None]:
    """The persons named; [None] if none."""
    persons: list[str | None] = list(ids.persons)
    return persons or [None]


def _outcome(code: grpc.StatusCode | None, response: Message | None) -> str:
    outcome = go_code_name(code)
    decision = getattr(response, "decision", None)
    if response is not None and isinstance(decision, int) and decision:
        enum = response.DESCRIPTOR.fields_by_name["decision"].enum_type
        value = enum.values_by_number.get(decision) if enum is not None else None
        outcome += ":" + (value.name if value is not None else str(decision))
    return outcome


def audit(trail: AuditSink, full_method: str, handler: Handler) -> Handler:
    if handler.unary_unary is None or not audited(full_method):
        return handler
    call = handler.unary_unary
    rpc = full_method.lstrip("/")

    async def recorded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        authenticated.set(None)
        at = datetime.now(UTC)
        response = None
        try:
            response = await call(request, context)  # type: ignore[arg-type]
            return response
        finally:
            principal = authenticated.get()
            if principal is not None:
                code = context.code() if response is None else None
                if response is None and code is None:
                    code = grpc.StatusCode.UNKNOWN
                outcome = _outcome(code, response)
                trail.record(records(rpc, principal, request, response, outcome, at))

    return grpc.unary_unary_rpc_method_handler(
        recorded,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuditedServer(WrappedServer):
    """A grpc.aio.Server (or a wrapper of one) whose audited unary handlers record each call."""

    def __init__(self, server: grpc.aio.Server, trail: AuditSink) -> None:
        super().__init__(server)
        self.trail = trail

    def wrap(self, full_method: str, handler: Handler) -> Handler:
        return audit(self.trail, full_method, handler)
