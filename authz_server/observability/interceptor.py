"""A server interceptor for gRPC metrics (go-grpc-prometheus style) and one JSON log line per
call. Handlers add merchant and decision to the line through `annotate`."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from authz_server.observability import metrics

log = logging.getLogger("authz_server.access")
_call_fields: ContextVar[dict[str, str] | None] = ContextVar("call_fields", default=None)


def annotate(**fields: str) -> None:
    """Adds fields (merchant, decision) to this call's log line; never personal data."""
    current = _call_fields.get()
    if current is not None:
        current.update(fields)


def go_code_name(code: grpc.StatusCode | None) -> str:
    """grpc.StatusCode.RESOURCE_EXHAUSTED -> 'ResourceExhausted', as Go's codes.Code prints."""
    if code is None:
        return "OK"
    return "".join(part.capitalize() for part in code.name.split("_"))


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, access_log: bool = True) -> None:
        self.access_log = access_log
        self._labels: dict[str, tuple[str, str]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        full_method: str = handler_call_details.method
        service, _, method = full_method.lstrip("/").rpartition("/")
        started = metrics.grpc_started.labels("unary", service, method)
        seconds = metrics.grpc_handling_seconds.labels("unary", service, method)
        inner = handler.unary_unary

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started.inc()
            fields: dict[str, str] = {}
            token = _call_fields.set(fields)
            begin = time.perf_counter()
            code: grpc.StatusCode | None = None
            try:
                response = await inner(request, context)  # type: ignore[arg-type]
                code = context.code()
                return response
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                elapsed = time.perf_counter() - begin
                name = go_code_name(code)
                seconds.observe(elapsed)
                metrics.grpc_handled.labels("unary", service, method, name).inc()
                _call_fields.reset(token)
                if self.access_log:
                    log.info(
                        "rpc",
                        extra={
                            "request_id": uuid.uuid4().hex[:16],
                            "rpc": method,
                            "code": name,
                            "latency_ms": round(elapsed * 1000, 3),
                            **fields,
                        },
                    )

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
