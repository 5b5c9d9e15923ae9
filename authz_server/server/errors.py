"""Maps domain errors to gRPC statuses with a google.rpc.ErrorInfo carrying the reason.

Business refusals of the authorization engine are not errors; they never come through here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from authz_server.domain.errors import (
    DomainError,
    IdempotencyKeyReused,
    InvalidArgument,
    NotFound,
    PolicyRefusal,
    Unavailable,
)
from authz_server.server.auth import PermissionDenied, Unauthenticated

DOMAIN = "medwallet.v1"
log = logging.getLogger(__name__)

_CODES: list[tuple[type[Exception], int, str]] = [
    (InvalidArgument, code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (PolicyRefusal, code_pb2.FAILED_PRECONDITION, ""),
    (NotFound, code_pb2.NOT_FOUND, "NOT_FOUND"),
    (IdempotencyKeyReused, code_pb2.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
    (Unavailable, code_pb2.UNAVAILABLE, "UNAVAILABLE"),
    (Unauthenticated, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (PermissionDenied, code_pb2.PERMISSION_DENIED, "PERMISSION_DENIED"),
]


def to_status(error: Exception) -> grpc.Status:
    code, reason = code_pb2.INTERNAL, "INTERNAL"
    for kind, kind_code, kind_reason in _CODES:
        if isinstance(error, kind):
            code = kind_code
            reason = kind_reason or (error.reason if isinstance(error, DomainError) else "")
            break
    metadata: dict[str, str] = {}
    if isinstance(error, InvalidArgument):
        metadata = {"field": error.field, "why": error.why}
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    message = str(error) if code != code_pb2.INTERNAL else "internal error"
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code, message=message, details=[detail])
    )
    return status


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def mapped(handler: Handler) -> Handler:
    """Wraps a servicer method: a domain error aborts the call with its status and reason."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await handler(self, request, context)
        except (DomainError, Unauthenticated, PermissionDenied) as error:
            await context.abort_with_status(to_status(error))
        except Exception as error:
            log.exception("unexpected error in %s", handler.__name__)
            await context.abort_with_status(to_status(error))

    return wrapper  # type: ignore[return-value]
