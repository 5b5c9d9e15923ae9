"""SIGTERM drains in-flight calls after turning NOT_SERVING; --workers 2 shares one port and
one metrics endpoint."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz_server.generated.medwallet.v1 import (
    authorization_pb2_grpc,
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from authz_server.runtime.embedded_redis import EmbeddedRedis
from tests.engine_factories import HOSPITAL, HOSPITAL_TOKEN, medical
from tests.harness import ADMIN
from tests.operations.server_process import ServerProcess

# Its servers are `serve` processes on SQLite in their data directory whatever TEST_DATABASE_URL
# says (ServerProcess drops DATABASE_URL): the PostgreSQL pass would only run them again on
# SQLite, so it leaves them out.
pytestmark = pytest.mark.backend_neutral


def _register_hospital(channel: grpc.Channel) -> None:
    registry_pb2_grpc.RegistryServiceStub(channel).UpsertMerchant(
        registry_pb2.UpsertMerchantRequest(
            merchant=registry_pb2.Merchant(
                merchant_id=HOSPITAL,
                kind=common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION,
                pooling_region="440300",
                designated=True,
                name="h",
            )
        ),
        metadata=ADMIN,
        timeout=10,
    )


@contextlib.contextmanager
def serving_hospital(
    tmp_path: Path,
) -> Iterator[tuple[ServerProcess, str, authorization_pb2_grpc.AuthorizationServiceStub]]:
    """A server on a private Redis (so the test may pause it) with a 15 s shutdown grace and a
    registered hospital: (server, Redis URL, Authorization stub); both stopped afterwards."""
    private = EmbeddedRedis(tmp_path / "redis", persistent=False)
    redis_url = private.start()
    server = ServerProcess(
        tmp_path,
        redis_url=redis_url,
        MEDWALLET_REDIS_TIMEOUT_SECONDS="10",
        MEDWALLET_SHUTDOWN_GRACE_SECONDS="15",
    )
    try:
        server.wait_serving()
        channel = grpc.insecure_channel(server.address)
        _register_hospital(channel)
        yield server, redis_url, authorization_pb2_grpc.AuthorizationServiceStub(channel)
    finally:
        server.stop()
        private.stop()


def test_sigterm_drains_in_flight_calls(tmp_path: Path) -> None:
    with serving_hospital(tmp_path) as (server, redis_url, stub):
        statuses: list[int] = []
        watcher_done = threading.Event()

        def watch() -> None:
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
            try:
                for answer in health.Watch(health_pb2.HealthCheckRequest(), timeout=60):
                    statuses.append(answer.status)
            except grpc.RpcError:
                pass
            watcher_done.set()

        threading.Thread(target=watch, daemon=True).start()
        time.sleep(0.5)
        # Hold every Redis command for 2 s, so the calls below are in flight at SIGTERM.
        redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "2000", "ALL")
        with ThreadPoolExecutor(8) as pool:
            calls = [
                pool.submit(stub.Authorize, medical(f"nobody-{i}", 100), metadata=HOSPITAL_TOKEN)
                for i in range(8)
            ]
            time.sleep(0.5)
            server.process.terminate()
            answers = [call.result(timeout=30) for call in calls]
        # The calls completed normally (a business decline: those people have no quota).
        assert len(answers) == 8
        assert all(answer.authorization_id for answer in answers)
        assert server.process.wait(30) == 0, server.output()
        watcher_done.wait(10)
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert statuses[0] == serving
        assert not_serving in statuses, statuses  # seen before the listener closed


def test_two_workers_one_port_one_scrape(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, workers=2, MEDWALLET_ACCESS_LOG="false")
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.address) as channel:
            _register_hospital(channel)
        # A worker may bind a moment after the other already answers health (a loaded machine
        # starts them seconds apart): call in rounds until both served, within a bound.
        calls = 0
        per_process: list[float] = []
        for _round in range(10):
            for index in range(40):  # a new connection each time: the kernel spreads them
                with grpc.insecure_channel(
                    server.address, options=[("grpc.use_local_subchannel_pool", 1)]
                ) as channel:
                    authorization_pb2_grpc.AuthorizationServiceStub(channel).Authorize(
                        medical(f"nobody-{calls}-{index}", 100), metadata=HOSPITAL_TOKEN, timeout=10
                    )
            calls += 40
            per_process = _authorize_calls_per_process(tmp_path / "data" / "metrics")
            if len(per_process) == 2 and all(count > 0 for count in per_process):
                break
        assert len(per_process) == 2, per_process
        assert all(count > 0 for count in per_process), per_process  # both workers served
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as page:
            text = page.read().decode()
        total = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("grpc_server_handled_total{") and 'grpc_method="Authorize"' in line
        )
        assert total == calls == sum(per_process)  # one scrape shows both processes' counts
        assert "medwallet_health_serving 1.0" in text
        assert 'medwallet_build_info{version="0.1.0"} 1.0' in text
        assert server.stop() == 0, server.output()
    finally:
        server.stop()


def _authorize_calls_per_process(metrics_dir: Path) -> list[float]:
    from prometheus_client.multiprocess import MultiProcessCollector

    per_process = []
    for path in sorted(metrics_dir.glob("counter_*.db")):
        merged = MultiProcessCollector.merge([str(path)])
        per_process.append(
            sum(
                sample.value
                for metric in merged
                for sample in metric.samples
                if sample.name == "grpc_server_handled_total"
                and sample.labels.get("grpc_method") == "Authorize"
            )
        )
    return per_process
