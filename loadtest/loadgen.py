"""The benchmark's load generator: closed loop (or paced), several processes, grpc.aio.

Every system (the echo floor, the service, the PostgreSQL baseline) is driven by exactly this
code with exactly the same request bytes: pharmacy baskets of two eligible lines, serialized
before the clock starts. A worker process opens several channels (separate connections, so
SO_REUSEPORT spreads them over the server's worker processes), warms up, waits for the start
signal, then keeps `concurrency` calls in flight until its share of the operations is done or
the time bound passes. An operation is Authorize, or Authorize then Capture of what was
approved (declined authorizations have nothing to capture).

Paced (`Plan.pace_per_second`): an open loop instead, for a latency at a given load rather than
at saturation. Operation i is sent at start + i / pace whatever the earlier ones are doing (up
to MAX_PACED_IN_FLIGHT at once), and its latency runs from when it was due, not from when it
left: a server that falls behind shows its queue in the latencies (no coordinated omission).

Each worker reports per-operation latencies, decisions, errors by status code, and the amount
approved per beneficiary (warm-up included) for the over-quota check.

A call answered UNAVAILABLE or DEADLINE_EXCEEDED is sent again with the same bytes (its
idempotency key), as a till does (RETRY_ATTEMPTS): its outcome is then known, so the money check
after a phase stays exact where the server could not answer at once (an Authorize whose hold was
placed before its answer was lost), and the phase reports the retries by the first answer's code.
An error is a call that failed all its tries, or with another code.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import grpc

from authz_server.generated.medwallet.v1 import authorization_pb2, common_pb2

AUTHORIZE = "/medwallet.v1.AuthorizationService/Authorize"
CAPTURE = "/medwallet.v1.AuthorizationService/Capture"
APPROVED = (authorization_pb2.DECISION_APPROVED, authorization_pb2.DECISION_PARTIALLY_APPROVED)
DEADLINE_SECONDS = 30.0
# Tries of a call answered RETRYABLE, the same request each time, RETRY_PAUSE_SECONDS x the try
# number apart (a till's retry on a timeout): ~1.5 s of pauses in all.
RETRY_ATTEMPTS = 6
RETRY_PAUSE_SECONDS = 0.1
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Paced calls in flight at once in one process, at most: a server far behind the pace gets a
# queue this deep from each load process, not an unbounded one.
MAX_PACED_IN_FLIGHT = 2_000


@dataclass(frozen=True)
class Plan:
    """What one worker process does."""

    address: str
    capture: bool
    operations: int
    warmup: int
    concurrency: int
    channels: int
    tokens: list[str]
    beneficiaries: list[str]
    items: tuple[str, str]
    line_fen: tuple[int, int]
    key_prefix: str
    time_bound: float
    seed: int
    # PEM CA of the server's TLS certificate; None: plaintext
    tls_root: bytes | None = None
    # operations a second this process sends, paced (0: closed loop, `concurrency` in flight)
    pace_per_second: float = 0.0


@dataclass
class Report:
    operations: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    # calls sent again with their idempotency key, by the code of the answer that made them
    retries: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    # Authorize+Capture: the Capture call alone (its Authorize is the rest of the latency)
    capture_latencies: list[float] = field(default_factory=list)
    # beneficiary -> [approved fen, approvals], warm-up included
    approved: dict[str, list[int]] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0
    response_bytes: int = 0
    responses: int = 0
    sample_authorize: bytes = b""
    sample_capture: bytes = b""


def requests(plan: Plan, count: int, offset: int) -> list[tuple[str, bytes]]:
    """(beneficiary, serialized AuthorizeRequest) for operations offset..offset+count-1."""
    rng = random.Random(plan.seed * 1_000_003 + offset)
    built = []
    amount = sum(plan.line_fen)
    for number in range(offset, offset + count):
        beneficiary = rng.choice(plan.beneficiaries)
        request = authorization_pb2.AuthorizeRequest(
            idempotency_key=f"{plan.key_prefix}{number:09d}",
            beneficiary_id=beneficiary,
            purpose=common_pb2.PURPOSE_PHARMACY,
            lines=[
                authorization_pb2.AuthorizationLine(
                    item_code=plan.items[0], quantity=1, amount_fen=plan.line_fen[0]
                ),
                authorization_pb2.AuthorizationLine(
                    item_code=plan.items[1], quantity=2, amount_fen=plan.line_fen[1]
                ),
            ],
            amount_fen=amount,
        )
        built.append((beneficiary, request.SerializeToString()))
    return built


async def retried(call: Any, body: bytes, token: Any, retries: Counter[str]) -> Any:
    """call(body), sent again with the same bytes while answered RETRYABLE (RETRY_ATTEMPTS)."""
    for attempt in range(1, RETRY_ATTEMPTS):
        try:
            return await call(body, metadata=token, timeout=DEADLINE_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE:
                raise
            retries[error.code().name] += 1
        await asyncio.sleep(RETRY_PAUSE_SECONDS * attempt)
    return await call(body, metadata=token, timeout=DEADLINE_SECONDS)


async def _drive(
    plan: Plan,
    counter: Synchronized[int],
    start: Any,
    ready: Any,
) -> Report:
    report = Report()
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 1 << 22)]
    channels = [
        grpc.aio.secure_channel(plan.address, grpc.ssl_channel_credentials(plan.tls_root), options)
        if plan.tls_root is not None
        else grpc.aio.insecure_channel(plan.address, options=options)
        for _ in range(plan.channels)
    ]
    authorize: list[Any] = [
        channel.unary_unary(
            AUTHORIZE, response_deserializer=authorization_pb2.AuthorizeResponse.FromString
        )
        for channel in channels
    ]
    capture: list[Any] = [
        channel.unary_unary(
            CAPTURE, response_deserializer=authorization_pb2.CaptureResponse.FromString
        )
        for channel in channels
    ]
    metadata = [(("authorization", f"Bearer {token}"),) for token in plan.tokens]
    for channel in channels:
        await channel.channel_ready()
    warm = requests(plan, plan.warmup, 0)
    work = requests(plan, plan.operations, plan.warmup)

    async def one(
        index: int, item: tuple[str, bytes], measure: bool, due: float | None = None
    ) -> None:
        beneficiary, body = item
        lane = index % len(channels)
        token = metadata[index % len(metadata)]
        began = time.perf_counter() if due is None else due
        try:
            answer = await retried(authorize[lane], body, token, report.retries)
            size = answer.ByteSize()
            if not report.sample_authorize and answer.decision in APPROVED:
                report.sample_authorize = answer.SerializeToString()
            decision = answer.decision
            approved = answer.approved_amount_fen if decision in APPROVED else 0
            if approved:  # held from now on, whatever becomes of the capture
                entry = report.approved.setdefault(beneficiary, [0, 0])
                entry[0] += approved
                entry[1] += 1
            capture_began = time.perf_counter()
            if plan.capture and approved:
                request = authorization_pb2.CaptureRequest(
                    authorization_id=answer.authorization_id,
                    idempotency_key=f"{plan.key_prefix}{index:09d}c",
                )
                captured = await retried(
                    capture[lane], request.SerializeToString(), token, report.retries
                )
                if not report.sample_capture:
                    report.sample_capture = captured.SerializeToString()
        except grpc.aio.AioRpcError as error:
            if measure:
                report.errors[error.code().name] += 1
            else:
                report.errors[f"warm-up {error.code().name}"] += 1
            return
        elapsed = time.perf_counter() - began
        if measure:
            report.latencies.append(elapsed)
            if plan.capture and approved:
                report.capture_latencies.append(time.perf_counter() - capture_began)
            report.decisions[authorization_pb2.Decision.Name(decision)] += 1
            report.response_bytes += size
            report.responses += 1

    async def lanes(items: list[tuple[str, bytes]], measure: bool, deadline: float) -> None:
        position = 0

        async def lane() -> None:
            nonlocal position
            while position < len(items) and time.monotonic() < deadline:
                index = position
                position += 1
                await one(index + (plan.warmup if measure else 0), items[index], measure)
                if measure:
                    report.operations += 1
                    if report.operations % 50 == 0:
                        counter.value += 50

        await asyncio.gather(*(lane() for _ in range(plan.concurrency)))

    async def paced(items: list[tuple[str, bytes]], deadline: float) -> None:
        interval = 1.0 / plan.pace_per_second
        slots = asyncio.Semaphore(MAX_PACED_IN_FLIGHT)
        sent: set[asyncio.Task[None]] = set()
        origin = time.perf_counter()

        async def timed(index: int, item: tuple[str, bytes], due: float) -> None:
            try:
                await one(index + plan.warmup, item, True, due)
                report.operations += 1
                if report.operations % 50 == 0:
                    counter.value += 50
            finally:
                slots.release()

        for index, item in enumerate(items):
            due = origin + index * interval
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            if time.monotonic() >= deadline:
                break
            await slots.acquire()
            task = asyncio.get_running_loop().create_task(timed(index, item, due))
            sent.add(task)
            task.add_done_callback(sent.discard)
        await asyncio.gather(*sent)

    await lanes(warm, False, time.monotonic() + plan.time_bound)
    ready.release()
    await asyncio.get_running_loop().run_in_executor(None, start.wait)
    report.started = time.monotonic()
    if plan.pace_per_second > 0:
        await paced(work, report.started + plan.time_bound)
    else:
        await lanes(work, True, report.started + plan.time_bound)
    report.ended = time.monotonic()
    counter.value += report.operations % 50
    for channel in channels:
        await channel.close()
    return report


def worker(plan: Plan, counter: Synchronized[int], start: Any, ready: Any, results: Any) -> None:
    """Entry point of a load-generator process (spawned)."""
    try:
        results.put(asyncio.run(_drive(plan, counter, start, ready)))
    except BaseException as error:  # the parent must hear of it, not wait forever
        ready.release()
        results.put(error)
        raise
