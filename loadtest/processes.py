"""Starting, watching and stopping the benchmark's server processes; CPU accounting."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Without a ready line per worker, how long the server must answer health checks first.
SETTLE_SECONDS = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_seconds(pids: list[int], *, tree: bool = True) -> float:
    """User + system CPU time of the processes (and their descendants, with `tree`) so far."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)] if tree else [root]
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            try:
                times = process.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += times.user + times.system
    return total


@dataclass
class Server:
    """A server subprocess whose log goes to a file; `ready_marker` lines count ready workers."""

    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    port: int
    workers: int = 1
    ready_marker: str = "serving on port"
    process: subprocess.Popen[bytes] | None = None
    extra_pids: list[int] = field(default_factory=list)
    # PEM CA the server's TLS certificate is checked against (None: plaintext)
    tls_root: bytes | None = None
    # the port of its Prometheus metrics (0: none; loadtest/sql_batches.py reads them)
    metrics_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 600.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        healthy_since: float | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log}")
            if self._healthy():
                healthy_since = healthy_since or time.monotonic()
                if self.ready_lines() >= self.workers:
                    return
                # No "serving" line per worker (a quieter log level): give the others time.
                if time.monotonic() - healthy_since > SETTLE_SECONDS:
                    return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {timeout:.0f}s; see {self.log}")

    def ready_lines(self) -> int:
        try:
            return self.log.read_text(errors="replace").count(self.ready_marker)
        except FileNotFoundError:
            return 0

    def _healthy(self) -> bool:
        try:
            channel = (
                grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.tls_root))
                if self.tls_root is not None
                else grpc.insecure_channel(self.address)
            )
            with channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2
                )
                return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def cpu(self) -> float:
        return cpu_seconds([self.pid])

    def worker_pids(self) -> list[int]:
        """The processes that serve calls: the children if it supervises workers, else itself."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        workers = []
        for child in children:
            try:
                line = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "spawn_main" in line and "resource_tracker" not in line:
                workers.append(child.pid)
        return workers or [self.pid]

    def stop(self, grace: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def run_workers(target: Callable[..., None], arguments: list[tuple[Any, ...]]) -> int:
    """Runs target(*args) in one spawned process per entry and waits for them all; SIGTERM and
    SIGINT are passed on, so stopping the parent stops the workers (the floor and the baseline
    share the service's SO_REUSEPORT pattern)."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=args) for args in arguments]
    for process in processes:
        process.start()

    def forward(_signum: int, _frame: Any) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for process in processes:
        process.join()
    return 0
