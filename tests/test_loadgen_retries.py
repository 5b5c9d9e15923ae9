"""The load generator sends a call answered UNAVAILABLE again with the same bytes (its
idempotency key), as a till does (loadtest/loadgen.py, RETRY_ATTEMPTS): the benchmark's money
check then knows the outcome of an Authorize whose first answer was lost. A call that fails all
its tries is an error. Against a real grpc.aio server that answers UNAVAILABLE as told."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2, authorization_pb2_grpc
from loadtest import loadgen

OPERATIONS = 12
WARMUP = 2
LINE_FEN = (100, 200)


class Flaky(authorization_pb2_grpc.AuthorizationServiceServicer):
    """Answers each key UNAVAILABLE `failures` times, then approves it in full (Authorize) or
    captures it; records every request's bytes by key."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.seen: dict[str, list[bytes]] = {}

    async def _fail_first(self, key: str, request: Any, context: Any) -> None:
        tries = self.seen.setdefault(key, [])
        tries.append(request.SerializeToString())
        if len(tries) <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

    async def Authorize(
        self, request: authorization_pb2.AuthorizeRequest, context: Any
    ) -> authorization_pb2.AuthorizeResponse:
        await self._fail_first(request.idempotency_key, request, context)
        return authorization_pb2.AuthorizeResponse(
            authorization_id=f"a-{request.idempotency_key}",
            decision=authorization_pb2.DECISION_APPROVED,
            approved_amount_fen=request.amount_fen,
        )

    async def Capture(
        self, request: authorization_pb2.CaptureRequest, context: Any
    ) -> authorization_pb2.CaptureResponse:
        await self._fail_first(request.idempotency_key, request, context)
        return authorization_pb2.CaptureResponse()


def drive(servicer: Flaky) -> loadgen.Report:
    async def main() -> loadgen.Report:
        server = grpc.aio.server()
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        plan = loadgen.Plan(
            address=f"127.0.0.1:{port}", capture=True, operations=OPERATIONS, warmup=WARMUP,
            concurrency=4, channels=1, tokens=["t"], beneficiaries=["b-1", "b-2"],
            items=("i-1", "i-2"), line_fen=LINE_FEN, key_prefix="retry-", time_bound=30.0,
            seed=1,
        )  # fmt: skip
        started = threading.Event()
        started.set()
        counter: Any = SimpleNamespace(value=0)
        try:
            return await loadgen._drive(plan, counter, started, threading.Semaphore(0))
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_a_call_answered_unavailable_is_sent_again_with_its_key_and_its_money_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loadgen, "RETRY_PAUSE_SECONDS", 0.001)
    servicer = Flaky(failures=2)
    report = drive(servicer)
    calls = OPERATIONS + WARMUP
    assert not report.errors, report.errors
    assert report.operations == OPERATIONS
    # every Authorize and every Capture tried three times, the same bytes each time
    assert len(servicer.seen) == 2 * calls
    assert all(len(tries) == 3 and len(set(tries)) == 1 for tries in servicer.seen.values())
    assert report.retries == Counter({"UNAVAILABLE": 2 * 2 * calls})
    # the approvals the retries got are counted for the money check
    assert sum(fen for fen, _ in report.approved.values()) == calls * sum(LINE_FEN)
    assert sum(count for _, count in report.approved.values()) == calls


def test_a_call_that_fails_every_try_is_an_error_and_its_money_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loadgen, "RETRY_PAUSE_SECONDS", 0.001)
    servicer = Flaky(failures=loadgen.RETRY_ATTEMPTS)
    report = drive(servicer)
    assert report.errors == Counter({"UNAVAILABLE": OPERATIONS, "warm-up UNAVAILABLE": WARMUP})
    assert all(len(tries) == loadgen.RETRY_ATTEMPTS for tries in servicer.seen.values())
    assert len(servicer.seen) == OPERATIONS + WARMUP  # no Capture of an unknown outcome
    assert not report.approved
