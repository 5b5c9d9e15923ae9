"""Typed exceptions for calls the service could not serve.

A business refusal at the till (not enough quota, an ineligible item, ...) is *not* an exception:
it is an AuthorizeResult with decision DECLINED. Everything else the service refuses arrives as a
gRPC status with a google.rpc.ErrorInfo; `error_from_rpc` turns it into one of the classes below,
carrying the ErrorInfo `reason` (machine-readable) and, for INVALID_ARGUMENT, the `field`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class ErrorReason(StrEnum):
    """The ErrorInfo reasons the contract names (README). `MedWalletError.reason` is a plain
    str, so a reason a newer server adds still arrives; compare it with these members."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAVAILABLE = "UNAVAILABLE"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_IN_FLIGHT = "TOO_MANY_IN_FLIGHT"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    CHANGE_REQUIRES_INSURANCE_EVENT = "CHANGE_REQUIRES_INSURANCE_EVENT"
    NO_PERSONAL_ACCOUNT = "NO_PERSONAL_ACCOUNT"
    PARTICIPANT_NOT_ACTIVE = "PARTICIPANT_NOT_ACTIVE"
    SELF_SHARING = "SELF_SHARING"
    HOLDER_NOT_EMPLOYEE = "HOLDER_NOT_EMPLOYEE"
    RELATION_NOT_ALLOWED = "RELATION_NOT_ALLOWED"
    DUPLICATE_RELATIONSHIP = "DUPLICATE_RELATIONSHIP"
    RELATIONSHIP_NOT_PENDING = "RELATIONSHIP_NOT_PENDING"
    RELATIONSHIP_NOT_ACTIVE = "RELATIONSHIP_NOT_ACTIVE"
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    INSUFFICIENT_QUOTA = "INSUFFICIENT_QUOTA"
    AUTHORIZATION_EXPIRED = "AUTHORIZATION_EXPIRED"
    ALREADY_CAPTURED = "ALREADY_CAPTURED"
    ALREADY_VOIDED = "ALREADY_VOIDED"
    AUTHORIZATION_DECLINED = "AUTHORIZATION_DECLINED"
    REFUND_EXCEEDS_CAPTURED = "REFUND_EXCEEDS_CAPTURED"


class MedWalletError(Exception):
    """A call the service did not serve. `code` is the gRPC status code; `reason` the ErrorInfo
    reason (the code's name when the status carried none, e.g. a dropped connection); `field`
    the request field an INVALID_ARGUMENT is about."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason or code.name
        self.metadata: Mapping[str, str] = MappingProxyType(dict(metadata or {}))
        self.field: str | None = self.metadata.get("field")
        # The keyed operation that raised it (medwallet_client.Operation), when one did:
        # `error.operation.run()` sends it again with the same idempotency key. Calling
        # `client.refund(...)` again instead draws a new key: a second refund.
        self.operation: Any = None
        super().__init__(f"{code.name} {self.reason}: {message}")

    @property
    def retryable(self) -> bool:
        """True for errors worth resending the same operation (same idempotency key) for."""
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    def to_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"code": self.code.name, "reason": self.reason}
        if self.field is not None:
            shown["field"] = self.field
        shown["message"] = self.message
        return shown


class InvalidArgumentError(MedWalletError):
    """The request is malformed; `field` names the field."""


class NotFoundError(MedWalletError):
    """No such participant, relationship or authorization (or another merchant's)."""


class AlreadyExistsError(MedWalletError):
    pass


class IdempotencyKeyReusedError(AlreadyExistsError):
    """The key was used before for a different request: nothing was done."""


class FailedPreconditionError(MedWalletError):
    """The policy refuses the change in the current state; `reason` says which rule."""


class UnauthenticatedError(MedWalletError):
    """No token, or a token the service does not know."""


class PermissionDeniedError(MedWalletError):
    """The token's principal may not make this call (e.g. a merchant token on the registry)."""


class UnavailableError(MedWalletError):
    """The service could not be reached or could not serve the call now. Resend the *same*
    operation (same idempotency key): it is never charged twice."""


class DeadlineExceededError(MedWalletError):
    """No answer within the deadline; the call may or may not have been served. Resend the same
    operation (same idempotency key) to learn which."""


class ServerError(MedWalletError):
    """Any other status (INTERNAL, UNKNOWN, ...)."""


_CLASSES: dict[grpc.StatusCode, type[MedWalletError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def _error_info(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata of a status, or ("", {}) when there is none."""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        return "", {}
    if status is None:
        return "", {}
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason), {str(k): str(v) for k, v in info.metadata.items()}
    return "", {}


def error_from_rpc(error: grpc.RpcError) -> MedWalletError:
    """The typed exception for a failed call."""
    code = grpc.StatusCode.UNKNOWN
    message = str(error)
    if isinstance(error, grpc.Call):
        code = error.code()
        message = error.details() or ""
    reason, metadata = _error_info(error)
    kind = _CLASSES.get(code, ServerError)
    if kind is AlreadyExistsError and reason == ErrorReason.IDEMPOTENCY_KEY_REUSED:
        kind = IdempotencyKeyReusedError
    return kind(code, message, reason, metadata)


# The command lines' exit status for a call the service did not serve, one per class
# (`medwallet` and `medwallet-authz call`; 0 served, 2 a usage error found before calling).
EXIT_CODES: Mapping[grpc.StatusCode, int] = MappingProxyType(
    {
        grpc.StatusCode.INVALID_ARGUMENT: 3,
        grpc.StatusCode.OUT_OF_RANGE: 3,
        grpc.StatusCode.UNAUTHENTICATED: 4,
        grpc.StatusCode.PERMISSION_DENIED: 4,
        grpc.StatusCode.NOT_FOUND: 5,
        grpc.StatusCode.FAILED_PRECONDITION: 6,
        grpc.StatusCode.ALREADY_EXISTS: 6,
        grpc.StatusCode.ABORTED: 6,
        grpc.StatusCode.UNAVAILABLE: 7,
        grpc.StatusCode.DEADLINE_EXCEEDED: 7,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 7,
    }
)
EXIT_CODES_HELP = (
    "exit status: 0 served; 2 usage (bad arguments or JSON); 3 INVALID_ARGUMENT; "
    "4 UNAUTHENTICATED or PERMISSION_DENIED; 5 NOT_FOUND; 6 refused in this state "
    "(FAILED_PRECONDITION, ALREADY_EXISTS); 7 try again (UNAVAILABLE, DEADLINE_EXCEEDED); "
    "1 anything else"
)


def exit_code(code: grpc.StatusCode) -> int:
    """The exit status for a failed call with this gRPC code (1 for unclassified ones)."""
    return EXIT_CODES.get(code, 1)


def retry_delay_s(error: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay of a RESOURCE_EXHAUSTED answer (a per-principal limit: the
    call was refused before anything was done, so resending it is always safe); else None."""
    if not isinstance(error, grpc.Call) or error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return None
    if status is None:
        return None
    for detail in status.details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return float(retry.retry_delay.ToTimedelta().total_seconds())
    return None
