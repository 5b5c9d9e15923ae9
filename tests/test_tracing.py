"""OpenTelemetry traces through the real service: a till's Authorize + Capture + Refund, made
with the Python client inside a trace of its own, continue into the server (the W3C
traceparent in the gRPC metadata), with spans for the handlers, their Redis scripts and the SQL
batches (linked to the calls they carry); the access log lines carry the trace id. The spans are
read from an in-memory exporter (the collector is outside the system)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from authz_server.generated.medwallet.v1 import (
    common_pb2,
    registry_pb2_grpc,
    relationship_pb2_grpc,
)
from clients import MedWalletClient, Purpose
from tests import engine_factories as ef
from tests import factories
from tests.harness import Harness

pytestmark = pytest.mark.backend_neutral


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the first SDK provider of this process
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(trace.get_tracer_provider(), TracerProvider)
    memory = InMemorySpanExporter()
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(memory))  # type: ignore[attr-defined]
    return memory


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory, exporter: InMemorySpanExporter
) -> Iterator[Harness]:
    running = Harness(Path(tmp_path_factory.mktemp("traced")), tracing=True)
    yield running
    running.close()


def client_registry(harness: Harness) -> registry_pb2_grpc.RegistryServiceStub:
    return registry_pb2_grpc.RegistryServiceStub(grpc.insecure_channel(harness.address))


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_log() -> Iterator[Lines]:
    lines = Lines()
    logger = logging.getLogger("authz_server.access")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(lines)
    logger.setLevel(level)


def _one(spans: list[ReadableSpan], name: str, parent: ReadableSpan) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.parent is not None
             and s.parent.span_id == parent.context.span_id]  # fmt: skip
    assert len(found) == 1, (name, [(s.name, s.parent) for s in spans])
    return found[0]


def test_a_traced_authorize_capture_and_refund(
    traced: Harness, exporter: InMemorySpanExporter, access_log: Lines
) -> None:
    with grpc.insecure_channel(traced.address) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        relationships = relationship_pb2_grpc.RelationshipServiceStub(channel)
        ef.merchant(registry, "merchant-a", common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
        holder, parent = factories.employee(registry, 100_000), factories.resident(registry)
        factories.active_relationship(relationships, holder, parent, 50_000)
    exporter.clear()
    till = trace.get_tracer("till")
    with (
        MedWalletClient(traced.address, token="test-merchant-a") as client,
        till.start_as_current_span("checkout") as checkout,
    ):
        result = client.prepare_authorize(
            parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=3_000
        ).run()
        assert result.approved
        client.capture(result.authorization_id, 2_000)
        client.refund(result.authorization_id, 500)
    trace_id = checkout.get_span_context().trace_id
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    root = next(s for s in spans if s.name == "checkout")

    def rpc(method: str) -> ReadableSpan:
        client_span = _one(spans, f"medwallet.v1.AuthorizationService/{method}", root)
        assert client_span.kind is SpanKind.CLIENT
        handler = _one(spans, f"medwallet.v1.AuthorizationService/{method}", client_span)
        assert handler.kind is SpanKind.SERVER
        return handler

    authorize = rpc("Authorize")
    script = [s for s in spans if s.parent and s.parent.span_id == authorize.context.span_id]
    assert any(s.name.startswith("redis ") and "authorize" in s.name for s in script), script
    capture = rpc("Capture")
    batch = _one(spans, "sql capture batch", capture)
    assert [link.context.span_id for link in batch.links] == [capture.context.span_id]
    assert any(s.name.startswith("redis capture_") for s in spans
               if s.parent and s.parent.span_id == capture.context.span_id)  # fmt: skip
    refund = rpc("Refund")
    refund_batch = _one(spans, "sql refund batch", refund)
    assert refund.context.span_id in [link.context.span_id for link in refund_batch.links]

    logged = {
        record.__dict__["rpc"]: record.__dict__.get("trace_id")
        for record in access_log.records
        if record.getMessage() == "rpc"
    }
    expected = format(trace_id, "032x")
    assert (logged["Authorize"], logged["Capture"], logged["Refund"]) == (expected,) * 3


def test_untraced_calls_make_no_server_spans(
    harness: Harness, exporter: InMemorySpanExporter
) -> None:
    """The session's server runs with MEDWALLET_TRACING off (the default)."""
    exporter.clear()
    with MedWalletClient(harness.address, token="test-admin") as client:
        client.get_participant(factories.employee(client_registry(harness)))
    kinds = {span.kind for span in exporter.get_finished_spans()}
    assert kinds == {SpanKind.CLIENT}
