"""Runs `medwallet-authz serve` as a real process for the operations tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import TOKENS


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess:
    def __init__(
        self,
        directory: Path,
        *,
        workers: int = 1,
        redis_url: str = "",
        data_dir: Path | None = None,
        port: int = 0,
        wrapper: list[str] | None = None,
        **env: str,
    ):
        """A server whose log and tokens are in `directory`, its data in `data_dir` (default
        `directory`/data), on gRPC `port` (default a free one); `wrapper`: a command the server's
        command line is appended to (it must exec it, so that signals reach the server)."""
        self.port = port or free_port()
        self.metrics_port = free_port()
        tokens = directory / "tokens.json"
        tokens.write_text(json.dumps(TOKENS))
        environment = dict(
            os.environ,
            MEDWALLET_DATA_DIR=str(data_dir or directory / "data"),
            MEDWALLET_GRPC_HOST="127.0.0.1",
            MEDWALLET_GRPC_PORT=str(self.port),
            MEDWALLET_METRICS_PORT=str(self.metrics_port),
            MEDWALLET_TOKENS_FILE=str(tokens),
            MEDWALLET_WORKERS=str(workers),
            # the limiter runs, refusing nothing, unless a test sets limits of its own
            MEDWALLET_MERCHANT_LIMIT="rate=1000000,burst=1000000,in_flight=100000",
            MEDWALLET_CHANNEL_LIMIT="rate=1000000,burst=1000000,in_flight=100000",
            **env,
        )
        if "DATABASE_URL" not in env:  # SQLite in the data directory unless a test says
            environment.pop("DATABASE_URL", None)
        if "PROMETHEUS_MULTIPROC_DIR" not in env:  # the data directory's unless a test says
            environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if redis_url:
            environment["REDIS_URL"] = redis_url
        self.log = (directory / "server.log").open("w")
        self.process = subprocess.Popen(
            [*(wrapper or []), sys.executable, "-m", "authz_server.cli", "serve"],
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.address = f"127.0.0.1:{self.port}"
        self.directory = directory

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.output()
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"server did not become SERVING:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.directory / "server.log").read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()
