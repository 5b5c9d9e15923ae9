"""MEDWALLET_EVENT_LOOP: what each choice resolves to, that the server and the benchmark's
floor run on it, and that grpc.aio answers on uvloop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2, authorization_pb2_grpc
from authz_server.runtime import event_loop
from authz_server.settings import Settings
from tests.harness import Harness
from tests.operations.server_process import free_port

pytestmark = pytest.mark.backend_neutral

ROOT = Path(__file__).resolve().parent.parent
uvloop = pytest.importorskip("uvloop")


def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_choices_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    assert event_loop.resolve("asyncio") == "asyncio"
    assert event_loop.resolve("uvloop") == "uvloop"
    assert event_loop.resolve("auto") == "uvloop"
    assert event_loop.resolve(" UVLoop ") == "uvloop"
    with pytest.raises(ValueError, match="expected one of auto, asyncio, uvloop"):
        event_loop.resolve("trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert event_loop.resolve("auto") == "asyncio"
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        event_loop.resolve("uvloop")


def test_the_setting_is_read_from_the_environment() -> None:
    assert Settings.from_environment({}).event_loop == Settings().event_loop
    assert Settings.from_environment({"MEDWALLET_EVENT_LOOP": "UVLOOP"}).event_loop == "uvloop"


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
def test_run_uses_the_chosen_loop(choice: str) -> None:
    async def which() -> str:
        return loop_module()

    assert event_loop.run(which(), choice) == choice


def test_the_test_server_runs_on_the_configured_loop(harness: Harness) -> None:
    async def which() -> str:
        return loop_module()

    assert harness.run(which()) == event_loop.resolve(harness.settings.event_loop)


def test_grpc_aio_answers_on_uvloop() -> None:
    """A grpc.aio server and client on uvloop: unary calls, an abort, a deadline."""

    class Servicer(authorization_pb2_grpc.AuthorizationServiceServicer):
        async def Authorize(
            self, request: authorization_pb2.AuthorizeRequest, context: grpc.aio.ServicerContext
        ) -> authorization_pb2.AuthorizeResponse:
            if request.amount_fen < 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "negative")
            if request.amount_fen == 0:
                await asyncio.sleep(5)
            return authorization_pb2.AuthorizeResponse(
                authorization_id=loop_module(), approved_amount_fen=request.amount_fen
            )

    async def main() -> tuple[str, list[int], grpc.StatusCode, grpc.StatusCode]:
        server = grpc.aio.server()
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = authorization_pb2_grpc.AuthorizationServiceStub(channel)
                answers = await asyncio.gather(
                    *(stub.Authorize(authorization_pb2.AuthorizeRequest(amount_fen=n)) for n in
                      range(1, 201))
                )  # fmt: skip
                codes = []
                for amount, timeout in ((-1, 5.0), (0, 0.2)):
                    try:
                        await stub.Authorize(
                            authorization_pb2.AuthorizeRequest(amount_fen=amount), timeout=timeout
                        )
                    except grpc.aio.AioRpcError as error:
                        codes.append(error.code())
        finally:
            await server.stop(0)
        return (
            answers[0].authorization_id,
            [answer.approved_amount_fen for answer in answers],
            *codes,
        )

    loop_name, amounts, aborted, late = event_loop.run(main(), "uvloop")
    assert loop_name == "uvloop"
    assert amounts == list(range(1, 201))
    assert aborted == grpc.StatusCode.INVALID_ARGUMENT
    assert late == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
def test_the_floor_runs_on_the_loop_it_is_given(tmp_path: Path, choice: str) -> None:
    response = authorization_pb2.AuthorizeResponse(authorization_id="a" * 32).SerializeToString()
    (tmp_path / "authorize.bin").write_bytes(response)
    (tmp_path / "capture.bin").write_bytes(b"")
    port = free_port()
    command = [
        sys.executable, "-m", "loadtest.echo_server", "--port", str(port),
        "--authorize-response", str(tmp_path / "authorize.bin"),
        "--capture-response", str(tmp_path / "capture.bin"), "--event-loop", choice,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert f"serving on port {port} (event loop: {choice})" in line, line
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = authorization_pb2_grpc.AuthorizationServiceStub(channel).Authorize(
                authorization_pb2.AuthorizeRequest(), timeout=10
            )
        assert answer.authorization_id == "a" * 32
    finally:
        process.terminate()
        process.wait(10)
