"""One server per data directory, and none joins a port another server holds (issue 12, point
4). A second `serve` on the same data directory started its own Redis on the first one's socket
(deleting it) and, through SO_REUSEPORT, silently shared gRPC port 50051: both took payments
against two copies of the quotas, and SQL ended with more captured than allocated."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz_server.generated.medwallet.v1 import authorization_pb2_grpc
from authz_server.runtime.embedded_redis import EmbeddedRedis
from tests.engine_factories import HOSPITAL_TOKEN, medical
from tests.harness import drop_database, fresh_database
from tests.operations.server_process import ServerProcess
from tests.operations.test_shutdown_and_workers import _register_hospital

# A refused server exits before it touches SQL or Redis; this bounds a loaded machine's Python
# start, and a server that was not refused (it serves) fails the test here rather than hang.
REFUSED_WITHIN_SECONDS = 30
# The tests marked with it start `serve` processes on SQLite in their data directory whatever
# TEST_DATABASE_URL says (ServerProcess drops DATABASE_URL): the PostgreSQL pass would only run
# them again on SQLite, so it leaves them out. The last test gives its servers the run's database.
ON_SQLITE_ANYWAY = pytest.mark.backend_neutral


def _refused(server: ServerProcess) -> tuple[int, str]:
    """(exit code, output) of a server that must exit by itself."""
    try:
        code = server.process.wait(REFUSED_WITHIN_SECONDS)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the second server was not refused:\n{server.output()}") from None
    return code, server.output()


def _still_serves(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        _register_hospital(channel)
        # Answered (a business decline: nobody has a quota), so its Redis answers it.
        answer = authorization_pb2_grpc.AuthorizationServiceStub(channel).Authorize(
            medical("nobody", 100), metadata=HOSPITAL_TOKEN, timeout=10
        )
        assert answer.authorization_id


@ON_SQLITE_ANYWAY
@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_server_on_a_data_directory_in_use_refuses_to_start(
    tmp_path: Path, workers: int
) -> None:
    data = tmp_path / "first" / "data"
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = ServerProcess(tmp_path / "first", workers=workers, MEDWALLET_ACCESS_LOG="false")
    second: ServerProcess | None = None
    try:
        first.wait_serving()
        socket = data / "redis" / "redis.sock"
        made = os.lstat(socket).st_ino
        # Only its gRPC and metrics ports differ, as in the issue.
        second = ServerProcess(tmp_path / "second", data_dir=data)
        code, output = _refused(second)
        assert code != 0, output
        assert str(data.resolve()) in output, output
        assert f"pid {first.process.pid}" in output, output  # the first one's (its supervisor)
        # The first server goes on, on its own Redis socket.
        assert os.lstat(socket).st_ino == made
        assert redis.Redis(unix_socket_path=str(socket)).ping()
        _still_serves(first)
        assert first.stop() == 0, first.output()
    finally:
        first.stop()
        if second is not None:
            second.stop()


@ON_SQLITE_ANYWAY
def test_a_server_refuses_a_grpc_port_another_server_holds(tmp_path: Path) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = ServerProcess(tmp_path / "first", MEDWALLET_ACCESS_LOG="false")
    second: ServerProcess | None = None
    try:
        first.wait_serving()
        # Its own data directory and Redis, the first one's gRPC port: SO_REUSEPORT let it join.
        second = ServerProcess(tmp_path / "second", port=first.port)
        code, output = _refused(second)
        assert code != 0, output
        assert f"port {first.port}" in output, output
        _still_serves(first)
    finally:
        first.stop()
        if second is not None:
            second.stop()


@ON_SQLITE_ANYWAY
def test_a_server_refuses_a_port_another_program_listens_on_with_so_reuseport(
    tmp_path: Path,
) -> None:
    """Not a medwallet server (no port lock of ours): the probe bind finds it."""
    import socket

    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        server = ServerProcess(tmp_path, port=port)
        try:
            code, output = _refused(server)
        finally:
            server.stop()
    assert code != 0, output
    assert f"port {port}" in output, output


@ON_SQLITE_ANYWAY
def test_workers_keep_the_data_directory_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    """The supervisor hands its lock to its workers (the same open file): killed outright, it
    leaves workers that still serve, and the directory stays theirs."""
    import psutil

    data = tmp_path / "first" / "data"
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = ServerProcess(tmp_path / "first", workers=2, MEDWALLET_ACCESS_LOG="false")
    left: list[psutil.Process] = []
    second: ServerProcess | None = None
    try:
        first.wait_serving()
        left = psutil.Process(first.process.pid).children(recursive=True)
        first.process.kill()
        first.process.wait(10)
        _still_serves(first)  # its workers
        second = ServerProcess(tmp_path / "second", data_dir=data)
        code, output = _refused(second)
        assert code != 0, output
        assert f"data directory {data.resolve()} is in use" in output, output
        assert f"pid {first.process.pid}, exited: its workers still run" in output, output
    finally:
        first.stop()
        for process in left:  # the workers and the private Redis, by their pids
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if second is not None:
            second.stop()


def test_the_data_directory_is_locked_with_redis_url_and_database_url_set_too(
    tmp_path: Path,
) -> None:
    """Its data directory then still holds the workers' metrics files (emptied at a start) and
    demo tokens: one server per data directory holds whatever the stores (PostgreSQL when the
    suite runs on it)."""
    private = EmbeddedRedis(tmp_path / "redis", persistent=False)
    redis_url = private.start()
    database_url = fresh_database(os.environ.get("TEST_DATABASE_URL"), tmp_path)
    data = tmp_path / "first" / "data"
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    stores = {"redis_url": redis_url, "DATABASE_URL": database_url}
    first = ServerProcess(tmp_path / "first", MEDWALLET_ACCESS_LOG="false", **stores)
    second: ServerProcess | None = None
    try:
        first.wait_serving()
        second = ServerProcess(tmp_path / "second", data_dir=data, **stores)
        code, output = _refused(second)
        assert code != 0, output
        assert f"data directory {data.resolve()} is in use" in output, output
        _still_serves(first)
    finally:
        first.stop()
        if second is not None:
            second.stop()
        private.stop()
        drop_database(database_url)


@ON_SQLITE_ANYWAY
def test_a_client_ca_without_the_servers_certificate_refuses_to_start(tmp_path: Path) -> None:
    """Mutual TLS asked for (a client CA) without the server's own certificate and key: the
    port would have been plaintext with merchant tokens accepted (an audit's note). It exits,
    saying what is missing."""
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_text("not read: the server refuses before it loads certificates\n")
    server = ServerProcess(tmp_path, MEDWALLET_TLS_CLIENT_CA_FILE=str(client_ca))
    try:
        code, output = _refused(server)
        assert code != 0, output
        assert "MEDWALLET_TLS_CLIENT_CA_FILE is set but MEDWALLET_TLS_CERT_FILE" in output, output
    finally:
        server.stop()
