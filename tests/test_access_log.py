"""The interceptor: one JSON access line per call with its fields, unique request ids, and one
wrapped handler per method, built once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2, authorization_pb2_grpc
from authz_server.observability import interceptor
from authz_server.observability.logs import JsonFormatter
from tests.engine_factories import HOSPITAL, HOSPITAL_TOKEN, medical

pytestmark = pytest.mark.backend_neutral


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("authz_server.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        access.removeHandler(handler)
        access.setLevel(level)


def test_one_line_per_call_with_its_fields(harness, authorizations, access_lines) -> None:
    for index in range(2):
        answer = authorizations.Authorize(medical(f"nobody-{index}", 100), metadata=HOSPITAL_TOKEN)
        assert answer.decision == authorization_pb2.DECISION_DECLINED
    with pytest.raises(grpc.RpcError):
        authorizations.Void(
            authorization_pb2.VoidRequest(authorization_id="0" * 32), metadata=HOSPITAL_TOKEN
        )
    # An aborted call's status reaches the client before the server's line is written.
    deadline = time.monotonic() + 5
    while access_lines.getvalue().count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    assert [(line["rpc"], line["code"]) for line in lines] == [
        ("Authorize", "OK"),
        ("Authorize", "OK"),
        ("Void", "NotFound"),
    ]
    for line in lines:
        assert line["logger"] == "authz_server.access" and line["message"] == "rpc"
        assert line["level"] == "INFO"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line["time"])
        assert re.fullmatch(r"[0-9a-f]{16}", line["request_id"])
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
    # What the handler annotated (Void adds nothing).
    assert [(line.get("merchant"), line.get("decision")) for line in lines] == [
        (HOSPITAL, "DECISION_DECLINED"),
        (HOSPITAL, "DECISION_DECLINED"),
        (None, None),
    ]
    assert len({line["request_id"] for line in lines}) == 3


def test_request_ids_are_unique_and_start_afresh_after_a_fork() -> None:
    ids = {interceptor.request_ids.next() for _ in range(10_000)}
    assert len(ids) == 10_000
    interceptor.request_ids.reseed()  # what a forked child runs: a new prefix, a new count
    assert re.fullmatch(r"[0-9a-f]{8}00000001", interceptor.request_ids.next())


def test_handlers_are_wrapped_once_as_they_are_added() -> None:
    """Unary handlers, added by name and through the generic handler, answer wrapped (metrics
    move); streaming ones and reflection work as before; made-up methods are not kept."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio
    from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
    from prometheus_client import REGISTRY

    service = "medwallet.v1.AuthorizationService"

    class Echo(authorization_pb2_grpc.AuthorizationServiceServicer):
        async def Authorize(self, request: Any, context: Any) -> Any:
            interceptor.annotate(merchant="m")
            return authorization_pb2.AuthorizeResponse(approved_amount_fen=request.amount_fen)

    def started(method: str, service: str = service) -> float:
        labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
        return REGISTRY.get_sample_value("grpc_server_started_total", labels) or 0.0

    async def main() -> None:
        observed = interceptor.ObservedServer(grpc.aio.server(), access_log=False)
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(Echo(), observed)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, observed)
        reflection.enable_server_reflection([service, reflection.SERVICE_NAME], observed)
        port = observed.add_insecure_port("127.0.0.1:0")
        await observed.start()
        try:
            wrapped = dict(observed._methods)
            assert f"/{service}/Authorize" in wrapped and "/grpc.health.v1.Health/Check" in wrapped
            assert "/grpc.health.v1.Health/Watch" not in wrapped  # streaming: as it was
            before, checks = started("Authorize"), started("Check", "grpc.health.v1.Health")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = authorization_pb2_grpc.AuthorizationServiceStub(channel)
                for amount in (1, 2):
                    answer = await stub.Authorize(
                        authorization_pb2.AuthorizeRequest(amount_fen=amount)
                    )
                    assert answer.approved_amount_fen == amount
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                watch.cancel()
                listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
                async for reply in listing:
                    names = {s.name for s in reply.list_services_response.service}
                    assert service in names
                unknown = channel.unary_unary("/made.up.Service/Method")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await unknown(b"")
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert started("Authorize") - before == 2
            assert started("Check", "grpc.health.v1.Health") - checks == 1
            assert observed._methods == wrapped  # built once; made-up names not kept
        finally:
            await observed.stop(0)
        unary = grpc.unary_unary_rpc_method_handler(Echo().Authorize)
        first = observed.wrap("/s.S/A", unary)
        assert observed.wrap("/s.S/A", unary) is first
        other = grpc.unary_unary_rpc_method_handler(Echo().Authorize)  # a new handler: rewrapped
        assert observed.wrap("/s.S/A", other) is not first

    asyncio.run(main())


def test_info_lines_are_written_in_batches_warnings_at_once() -> None:
    from authz_server.observability.logs import BatchingStreamHandler

    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval=3600)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.batching")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        changing = ["before"]
        logger.info("rpc", extra={"request_id": "r1"})
        logger.info("state %s", changing)
        changing[0] = "after"  # the line says what it was when logged
        assert stream.getvalue() == ""  # waiting for the writer
        logger.warning("slow", extra={"rpc": "Capture"})  # written at once, after the others
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["message"] for line in lines] == ["rpc", "state ['before']", "slow"]
        assert lines[0]["request_id"] == "r1" and lines[2]["level"] == "WARNING"
        logger.info("last")
    finally:
        logger.removeHandler(handler)
        handler.close()  # what logging.shutdown() does at exit: writes what is queued
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "last"
    handler.writer.join(timeout=5)
    assert not handler.writer.is_alive()  # close() ends the writer thread


def test_the_writer_thread_writes_within_its_interval() -> None:
    from authz_server.observability.logs import BatchingStreamHandler

    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval=0.05)
    handler.setFormatter(JsonFormatter())
    try:
        handler.handle(logging.makeLogRecord({"msg": "rpc", "levelno": 20, "levelname": "INFO"}))
        deadline = time.monotonic() + 5
        while not stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert json.loads(stream.getvalue())["message"] == "rpc"
    finally:
        handler.close()


def test_a_process_that_exits_writes_its_queued_lines() -> None:
    import subprocess
    import sys

    code = (
        "import logging; from authz_server.observability import logs; logs.configure('INFO');"
        "logging.getLogger('authz_server.access').info('rpc', extra={'code': 'OK'})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip())["code"] == "OK"
