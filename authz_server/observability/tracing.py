"""OpenTelemetry traces (MEDWALLET_TRACING, off by default).

When on, every call gets a SERVER span continuing the caller's W3C `traceparent` from the gRPC
metadata (observability/interceptor.py), the access log line carries its trace id, each Redis
round trip that runs a script is a child span (storage/redis/pipelined.py), and each SQL batch
(captures, refunds) is a span that LINKS to every call it carries, parented by the first.
Spans go over OTLP/gRPC to MEDWALLET_OTLP_ENDPOINT when that is set.

The storage layers make spans only inside a recording span, so with tracing off (no server
span) they cost one context lookup, and background work (the sweeper) is never traced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Tracer

log = logging.getLogger("authz_server")
SERVICE_NAME = "medwallet-authz"
tracer: Tracer = trace.get_tracer("authz_server")


# False until configure() turns tracing on in this process: until then no span records, and the
# per-call look-ups below (the current span in the context) are skipped. Never set back: another
# server of the same process may still trace.
_recording = False


def configure(enabled: bool, otlp_endpoint: str) -> bool:
    """Installs an SDK tracer provider (exporting to otlp_endpoint when set) unless the process
    has one already (a test's in-memory exporter, an embedding program's). Returns enabled."""
    global _recording
    if not enabled:
        return False
    _recording = True
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return True
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=_insecure(otlp_endpoint))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing: spans go over OTLP to %s", otlp_endpoint)
    else:
        log.info("tracing: on, no MEDWALLET_OTLP_ENDPOINT: spans are made but not exported")
    trace.set_tracer_provider(provider)
    return True


def _insecure(endpoint: str) -> bool:
    return not endpoint.startswith("https://")


@contextmanager
def server_span(full_method: str, metadata: Iterable[tuple[str, Any]] | None) -> Iterator[Span]:
    """The handler's span, continuing the trace of the caller's traceparent if it sent one."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    service, _, method = full_method.lstrip("/").rpartition("/")
    with tracer.start_as_current_span(
        full_method.lstrip("/"),
        context=propagate.extract(carrier),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
    ) as span:
        yield span


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits (as OTLP and W3C write it), or None."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def caller() -> SpanContext | None:
    """The current call's span context if it is traced (kept to link a batch to it)."""
    if not _recording:
        return None
    span = trace.get_current_span()
    return span.get_span_context() if span.is_recording() else None


@contextmanager
def redis_span(scripts: Sequence[str], commands: int) -> Iterator[None]:
    """A client span around one Redis round trip that runs scripts, inside a traced call."""
    if not trace.get_current_span().is_recording():
        yield
        return
    with tracer.start_as_current_span(
        f"redis {' '.join(scripts)}",
        kind=SpanKind.CLIENT,
        attributes={
            "db.system": "redis",
            "db.operation": "EVALSHA",
            "medwallet.redis.scripts": list(scripts),
            "medwallet.redis.commands": commands,
        },
    ):
        yield


def remember_caller(callers: dict[Any, SpanContext], key: Any) -> None:
    """Keeps the current call's span context under key (its place in a batch), if traced."""
    if not _recording:
        return
    span = trace.get_current_span()
    if span.is_recording():
        callers[key] = span.get_span_context()


def callers_of(callers: dict[Any, SpanContext], keys: Iterable[Any]) -> list[SpanContext]:
    """The span contexts kept for keys (taken out: each batch once)."""
    if not callers:
        return []
    return [context for key in keys if (context := callers.pop(key, None)) is not None]


@contextmanager
def batch_span(name: str, callers: Sequence[SpanContext], size: int) -> Iterator[None]:
    """A span around one SQL batch commit of size units, linked to every traced call it carries
    and parented by the first (so it shows in that call's trace); none traced: no span."""
    links = [Link(context) for context in callers]
    if not links:
        yield
        return
    parent = trace.set_span_in_context(trace.NonRecordingSpan(links[0].context))
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.INTERNAL,
        links=links,
        attributes={
            "db.operation": "COMMIT",
            "medwallet.batch.size": size,
            "medwallet.batch.traced_calls": len(links),
        },
    ):
        yield
