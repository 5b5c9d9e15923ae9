"""Bad input at the edge: a request body that does not parse is INVALID_ARGUMENT, not UNKNOWN.

grpc.aio calls a method's request deserializer before the handler; when it raises (bad UTF-8
in a string field, a truncated field, a wrong wire type) the call ends UNKNOWN and grpc logs an
ERROR with a traceback, once per call, which feeds the error-ratio alert. `EdgeServer` registers
every unary handler with a deserializer that never raises: a body that does not parse becomes
an `Unparsable` marker, and the handler answers INVALID_ARGUMENT naming the message type,
without running the method (so nothing is read or written for it).

The transport bounds (message and metadata size, streams per connection, keepalive) are
channel arguments: `server_options`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from authz_server.domain.errors import InvalidArgument
from authz_server.server.errors import to_status
from authz_server.server.wrapped_server import Handler, WrappedServer
from authz_server.settings import Settings


def server_options(settings: Settings, reuse_port: bool = True) -> list[tuple[str, int]]:
    """grpc.aio channel arguments bounding what one client or connection may send.
    `reuse_port`: False for a private port of this process alone (the TLS front's)."""
    return [
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # A body over this is RESOURCE_EXHAUSTED before it is read into memory.
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        # Request headers (metadata) over this are refused (the call fails, the server stays).
        # The soft limit alone refuses only some calls between it and the hard limit (twice it
        # by default): both are set, so every call over it is refused.
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
        # Calls in flight on one HTTP/2 connection; more wait in the client (streams limit).
        ("grpc.max_concurrent_streams", settings.max_calls_per_connection),
        # Keepalive enforcement: a client pinging more often than this without calls in flight
        # gets a strike; after max_ping_strikes the connection is closed with GOAWAY
        # ENHANCE_YOUR_CALM (a ping flood costs the server, not the client).
        ("grpc.http2.min_ping_interval_without_data_ms", settings.min_client_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", settings.max_ping_strikes),
        # Clients may keep an idle connection alive with pings (POS terminals between sales).
        ("grpc.keepalive_permit_without_calls", 1),
        # The server pings an idle connection this often and drops it when no answer comes in
        # keepalive_timeout: dead terminals do not hold connections (and their streams).
        ("grpc.keepalive_time_ms", settings.server_keepalive_ms),
        ("grpc.keepalive_timeout_ms", settings.server_keepalive_timeout_ms),
    ]


@dataclass(frozen=True)
class Unparsable:
    """What a request body that did not parse deserializes to."""

    message_type: str
    why: str


def _tolerant(deserialize: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    def tolerant(body: bytes) -> Any:
        try:
            return deserialize(body)
        except Exception as error:  # protobuf's DecodeError, or a UnicodeDecodeError
            return Unparsable(message_type, type(error).__name__)

    return tolerant


def _message_type(deserialize: Callable[[bytes], Any] | None) -> str:
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request"))


def guarded(handler: Handler) -> Handler:
    """The handler with a deserializer that never raises (unary-unary only; others as they
    are)."""
    if handler.unary_unary is None or handler.request_deserializer is None:
        return handler
    call = handler.unary_unary
    message_type = _message_type(handler.request_deserializer)

    async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Unparsable):
            error = InvalidArgument(
                "request", f"body does not parse as {request.message_type} ({request.why})"
            )
            await context.abort_with_status(to_status(error))
        return await call(request, context)  # type: ignore[arg-type]

    return grpc.unary_unary_rpc_method_handler(
        checked,
        request_deserializer=_tolerant(handler.request_deserializer, message_type),
        response_serializer=handler.response_serializer,
    )


class EdgeServer(WrappedServer):
    """A grpc.aio.Server (or a wrapper of one) whose unary handlers are registered guarded."""

    def wrap(self, full_method: str, handler: Handler) -> Handler:
        return guarded(handler)
