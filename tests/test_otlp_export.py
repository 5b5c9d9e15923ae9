"""OTLP export when configured: `medwallet-authz serve` with MEDWALLET_TRACING=true and
MEDWALLET_OTLP_ENDPOINT sends its spans to a collector (the benchmark's stand-in,
loadtest/otlp_sink.py, a real OTLP/gRPC server in its own process); with the default settings
it sends none."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from authz_server.generated.medwallet.v1 import registry_pb2, registry_pb2_grpc
from tests.harness import ADMIN
from tests.operations.server_process import ServerProcess, free_port

pytestmark = pytest.mark.backend_neutral


def _spans_sent(directory: Path, **env: str) -> int:
    port = free_port()
    count_file = directory / "spans.txt"
    sink = subprocess.Popen(
        [sys.executable, "-m", "loadtest.otlp_sink", "--port", str(port),
         "--count-file", str(count_file)]
    )  # fmt: skip
    time.sleep(1.0)
    settings = {
        key: value.replace("SINK", f"http://127.0.0.1:{port}") for key, value in env.items()
    }
    server = ServerProcess(directory, **settings)
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.address) as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            for _ in range(3):
                request = registry_pb2.GetParticipantRequest(participant_id="nobody")
                try:
                    registry.GetParticipant(request, metadata=ADMIN)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND
    finally:
        assert server.stop() == 0, server.output()  # a clean exit flushes the exporter
        sink.terminate()
        sink.wait(timeout=30)
    return int(count_file.read_text())


def test_spans_go_to_the_configured_collector(tmp_path: Path) -> None:
    sent = _spans_sent(tmp_path, MEDWALLET_TRACING="true", MEDWALLET_OTLP_ENDPOINT="SINK")
    assert sent >= 3  # a SERVER span per call at least


def test_off_by_default(tmp_path: Path) -> None:
    assert _spans_sent(tmp_path, MEDWALLET_OTLP_ENDPOINT="SINK") == 0
