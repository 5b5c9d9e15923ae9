"""A generic JSON caller for every RPC of the contract (for trying things and for demos).

Exit codes, one per class of outcome (clients/errors.py, shared with `medwallet`; printed with
every error): 0 answered; 2 the request could not be sent as written (bad JSON, unknown method
or field, bad enum name); 3 the request is invalid (INVALID_ARGUMENT, OUT_OF_RANGE); 4 the token
(UNAUTHENTICATED, PERMISSION_DENIED); 5 NOT_FOUND; 6 refused in this state (FAILED_PRECONDITION,
ALREADY_EXISTS, ABORTED); 7 try again (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED);
1 anything else (INTERNAL, UNKNOWN, ...).
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

import grpc
from google.protobuf import message_factory
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from authz_server.runtime.call_request import (
    BadRequest,
    all_methods,
    answer_json,
    find_method,
    method_name,
    parse_request,
)
from clients.errors import exit_code

EXIT_USAGE = 2


def list_methods() -> int:
    for method in all_methods():
        print(f"{method_name(method)}  ({method.input_type.name} -> {method.output_type.name})")
    return 0


def call_json(
    host: str, port: int, name: str, request_json: str, token: str, *, fresh_key: bool = False
) -> int:
    try:
        method = find_method(name)
        request = parse_request(method, request_json)
    except BadRequest as error:
        print(f"medwallet-authz call: {error}", file=sys.stderr)
        return EXIT_USAGE
    if fresh_key:
        if "idempotency_key" not in method.input_type.fields_by_name:
            print(f"medwallet-authz call: {method.name} takes no idempotency_key", file=sys.stderr)
            return EXIT_USAGE
        key = f"call-{uuid.uuid4().hex[:16]}"
        request.idempotency_key = key  # type: ignore[attr-defined]
        print(f"idempotency_key: {key} (send it again to retry this very call)", file=sys.stderr)
    response_class = message_factory.GetMessageClass(method.output_type)
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub: grpc.UnaryUnaryMultiCallable[Any, Any] = channel.unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        try:
            response = stub(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        except grpc.RpcError as error:
            return _print_error(error)
    print(answer_json(response))
    return 0


def _print_error(error: grpc.RpcError) -> int:
    """The status as JSON on stderr: code, message, ErrorInfo reason, domain and metadata."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    shown: dict[str, Any] = {
        "code": code.name,
        "message": error.details() if isinstance(error, grpc.Call) else str(error),
    }
    info = _error_info(error)
    if info is not None:
        shown.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
    shown["exit"] = exit_code(code)
    print(json.dumps(shown, ensure_ascii=False, indent=2), file=sys.stderr)
    return exit_code(code)


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None
