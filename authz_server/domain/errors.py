"""Domain errors. The transport maps each class to one gRPC status code."""

from __future__ import annotations


class DomainError(Exception):
    """Base class; `reason` is the machine-readable code (google.rpc.ErrorInfo reason)."""

    reason: str = "DOMAIN_ERROR"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.message = message


class InvalidArgument(DomainError):
    """The request is malformed; nothing was written. INVALID_ARGUMENT."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


class PolicyRefusal(DomainError):
    """The policy forbids it in the current state. FAILED_PRECONDITION with `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason)


class LedgerLimitExceeded(PolicyRefusal):
    """The ledger (SQL) cannot pay what the hot state (Redis) approved: the quota's unused money
    in SQL is less than the capture draws from it. Redis overstated the quota; nothing was
    written. FAILED_PRECONDITION, reason LEDGER_LIMIT_EXCEEDED."""

    def __init__(self, relationship_id: str, unused_fen: int, asked_fen: int) -> None:
        super().__init__(
            "LEDGER_LIMIT_EXCEEDED",
            f"relationship {relationship_id} has {unused_fen} fen unused in the ledger,"
            f" less than the {asked_fen} fen asked",
        )
        self.relationship_id = relationship_id
        self.unused_fen = unused_fen
        self.asked_fen = asked_fen


class NotFound(DomainError):
    """NOT_FOUND. Also what a merchant gets for another merchant's authorization."""

    reason = "NOT_FOUND"


class IdempotencyKeyReused(DomainError):
    """The same idempotency key came with a different request. ALREADY_EXISTS."""

    reason = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency_key {key!r} was already used with a different request")


class Unavailable(DomainError):
    """A dependency (Redis, SQL) did not answer in time; nothing was half-done. UNAVAILABLE."""

    reason = "UNAVAILABLE"
