"""The load generator's paced mode (loadtest/loadgen.py) is an open loop: it sends at its pace
however fast the server answers, and times each call from when it was due. Against the echo
floor, which answers at once, a closed loop would send thousands of calls a second; paced at
100 a second for a second it sends about 100."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import grpc

from authz_server.generated.medwallet.v1 import authorization_pb2, authorization_pb2_grpc
from loadtest import loadgen
from loadtest.echo_server import Echo

PACE_PER_SECOND = 100.0
SECONDS = 1.0


async def _paced_run(port: int) -> loadgen.Report:
    plan = loadgen.Plan(
        address=f"127.0.0.1:{port}", capture=False, operations=10_000, warmup=5, concurrency=8,
        channels=1, tokens=["t"], beneficiaries=["b-1"], items=("i-1", "i-2"),
        line_fen=(100, 200), key_prefix="pace-", time_bound=SECONDS, seed=1,
        pace_per_second=PACE_PER_SECOND,
    )  # fmt: skip
    started = threading.Event()
    started.set()
    counter: Any = SimpleNamespace(value=0)
    return await loadgen._drive(plan, counter, started, threading.Semaphore(0))


def test_a_paced_load_sends_at_its_pace_not_as_fast_as_answered() -> None:
    async def main() -> loadgen.Report:
        server = grpc.aio.server()
        answer = authorization_pb2.AuthorizeResponse(authorization_id="a" * 32)
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(
            Echo(
                answer.SerializeToString(), authorization_pb2.CaptureResponse().SerializeToString()
            ),
            server,
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await _paced_run(port)
        finally:
            await server.stop(None)

    report = asyncio.run(main())
    expected = PACE_PER_SECOND * SECONDS
    # an open loop cannot run ahead of its schedule; a closed loop against an echo would send
    # far more (each call takes well under a millisecond here)
    assert 0.5 * expected <= report.operations <= expected + 1, report.operations
    assert not report.errors, report.errors
    assert len(report.latencies) == report.operations
