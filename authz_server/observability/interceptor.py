"""gRPC metrics (go-grpc-prometheus style) and one JSON log line per call, around every unary
handler of the server. Handlers add merchant and decision to the line through `annotate`.

The handlers are wrapped once, when the services are added to the server (`ObservedServer`),
not per call by a grpc.aio ServerInterceptor: with grpcio 1.85 a do-nothing interceptor alone
costs ~30 µs of CPU a call (an echo server: ~300 µs a call without, ~330 with), more than
everything the wrapper does. What can be done once is done once: the label children of a
method are looked up when it is wrapped; request ids are a per-process random prefix and a
counter (uuid4 reads the kernel's random source on every call).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from contextvars import ContextVar
from typing import Any

import grpc

from authz_server.observability import metrics, tracing
from authz_server.server.wrapped_server import Handler, WrappedServer

log = logging.getLogger("authz_server.access")
_call_fields: ContextVar[dict[str, str] | None] = ContextVar("call_fields", default=None)
_perf_counter = time.perf_counter


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


_GO_CODE_NAMES: dict[grpc.StatusCode | None, str] = {
    code: go_code_name(code) for code in [None, *grpc.StatusCode]
}


def _code_name(code: grpc.StatusCode | None) -> str:
    return _GO_CODE_NAMES.get(code) or go_code_name(code)


class _RequestIds:
    """16 hex digits: 8 random per process, then a counter. Unique within a process; across
    processes (workers, restarts) two share a prefix with probability ~n²/2³³."""

    def __init__(self) -> None:
        self.reseed()
        # A forked child must not repeat its parent's ids (workers are spawned, but be safe).
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(4).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):08x}"


request_ids = _RequestIds()


class _Method:
    """What one method's calls share: label children looked up once, and the wrapped handler."""

    def __init__(
        self, full_method: str, inner: Handler, access_log: bool, traced: bool = False
    ) -> None:
        self.inner = inner
        self.full_method = full_method
        self.traced = traced
        self.call = inner.unary_unary
        service, _, self.method = full_method.lstrip("/").rpartition("/")
        self.service = service
        self.started = metrics.grpc_started.labels("unary", service, self.method)
        self.seconds = metrics.grpc_handling_seconds.labels("unary", service, self.method)
        # Status code -> grpc_handled child, filled on first use (at most 17 codes).
        self.handled: dict[grpc.StatusCode | None, Any] = {}
        self.access_log = access_log
        self.wrapped: Handler = grpc.unary_unary_rpc_method_handler(
            self.observed_in_span if traced else self.observed,
            request_deserializer=inner.request_deserializer,
            response_serializer=inner.response_serializer,
        )

    def _handled(self, code: grpc.StatusCode | None) -> Any:
        child = self.handled[code] = metrics.grpc_handled.labels(
            "unary", self.service, self.method, _code_name(code)
        )
        return child

    async def observed_in_span(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        """observed() inside the call's span (MEDWALLET_TRACING): the caller's trace goes on."""
        with tracing.server_span(self.full_method, context.invocation_metadata()) as span:
            response = await self.observed(request, context)
            code = context.code()
            if code not in (None, grpc.StatusCode.OK):
                span.set_attribute("rpc.grpc.status_code", code.value[0])
            return response

    async def observed(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.started.inc()
        fields: dict[str, str] = {}
        token = _call_fields.set(fields)
        begin = _perf_counter()
        code: grpc.StatusCode | None = None
        try:
            response = await self.call(request, context)  # type: ignore[misc,arg-type]
            code = context.code()
            return response
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            elapsed = _perf_counter() - begin
            _call_fields.reset(token)
            self.seconds.observe(elapsed)
            (self.handled.get(code) or self._handled(code)).inc()
            if self.access_log and log.isEnabledFor(logging.INFO):
                if self.traced:
                    fields["trace_id"] = tracing.current_trace_id() or ""
                log.info(
                    "rpc",
                    extra={
                        "request_id": request_ids.next(),
                        "rpc": self.method,
                        "code": _code_name(code),
                        "latency_ms": round(elapsed * 1000, 3),
                        **fields,
                    },
                )


class ObservedServer(WrappedServer):
    """A grpc.aio.Server whose unary-unary handlers are registered observed (server/
    wrapped_server.py). Streaming handlers are registered as they are (not observed)."""

    def __init__(
        self, server: grpc.aio.Server, access_log: bool = True, traced: bool = False
    ) -> None:
        super().__init__(server)
        self.access_log = access_log
        self.traced = traced
        # Full method name -> its wrapper.
        self._methods: dict[str, _Method] = {}

    def wrap(self, full_method: str, handler: Handler) -> Handler:
        if handler.unary_unary is None:
            return handler
        known = self._methods.get(full_method)
        if known is None or known.inner is not handler:
            known = self._methods[full_method] = _Method(
                full_method, handler, self.access_log, self.traced
            )
        return known.wrapped
