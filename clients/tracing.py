"""Traces from the till: each call of MedWalletClient is a CLIENT span, and its W3C
`traceparent` goes to the service in the gRPC metadata, so the server's spans join the trace.

With only opentelemetry-api (no SDK configured by the application) the spans are no-ops and
nothing is sent, unless the application is inside a trace of its own: then that trace is
propagated. An application that configures the OpenTelemetry SDK gets real client spans.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

tracer = trace.get_tracer("medwallet.clients")


def method_name(method: Any, request: Any) -> str:
    """'/medwallet.v1.AuthorizationService/Authorize' as gRPC names it, else the request's
    type without 'Request'."""
    raw = getattr(method, "_method", None)
    if isinstance(raw, bytes):
        return raw.decode()
    return type(request).__name__.removesuffix("Request")


@contextmanager
def client_span(method: Any, request: Any) -> Iterator[tuple[tuple[str, str], ...]]:
    """The call's span; yields the metadata that carries its context (traceparent)."""
    name = method_name(method, request).lstrip("/")
    service, _, rpc = name.rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
    with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield tuple(carrier.items())
