"""The limiter's memory of rate refusals (server/limits.py RefusalMemo): a principal refused for
its rate is refused locally, with the time left, until Redis's delay has passed; refusals for
calls in flight are never remembered; the memory stays bounded. And how long a refused call is
held before its answer (hold_seconds)."""

from __future__ import annotations

from authz_server.server.limits import (
    DEADLINE_MARGIN_SECONDS,
    MIN_HOLD_SECONDS,
    RefusalMemo,
    hold_seconds,
)
from authz_server.storage.redis.rate_limiter import Verdict


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_rate_refusal_is_remembered_until_its_delay_passes() -> None:
    clock = Clock()
    memo = RefusalMemo(clock)
    assert memo.refusal("merchant:m1") is None
    memo.remember("merchant:m1", Verdict(False, 250, "RATE_LIMITED"))
    clock.now += 0.0625  # binary fractions: exact
    assert memo.refusal("merchant:m1") == Verdict(False, 188, "RATE_LIMITED")
    assert memo.refusal("merchant:m2") is None  # only that principal
    clock.now += 0.1875
    assert memo.refusal("merchant:m1") is None  # the bucket may hold a token again: ask Redis
    assert "merchant:m1" not in memo.until


def test_an_in_flight_refusal_is_not_remembered() -> None:
    memo = RefusalMemo(Clock())
    memo.remember("merchant:m1", Verdict(False, 20, "TOO_MANY_IN_FLIGHT"))
    assert memo.refusal("merchant:m1") is None


def test_the_memory_is_bounded() -> None:
    clock = Clock()
    memo = RefusalMemo(clock)
    for number in range(RefusalMemo.MAX_ENTRIES):
        memo.remember(f"merchant:{number}", Verdict(False, 10, "RATE_LIMITED"))
    clock.now += 1.0  # all of them expired
    memo.remember("merchant:new", Verdict(False, 1000, "RATE_LIMITED"))
    assert list(memo.until) == ["merchant:new"]
    for number in range(RefusalMemo.MAX_ENTRIES):
        memo.remember(f"merchant:live-{number}", Verdict(False, 1000, "RATE_LIMITED"))
    assert len(memo.until) <= RefusalMemo.MAX_ENTRIES


def test_a_refused_call_is_held_within_its_retry_delay_its_deadline_and_the_setting() -> None:
    refused = Verdict(False, 250, "RATE_LIMITED")
    assert hold_seconds(refused, 0.1, None) == 0.1  # the setting
    assert hold_seconds(Verdict(False, 40, "RATE_LIMITED"), 0.1, None) == 0.04  # the delay
    assert hold_seconds(refused, 0.1, 0.06) == 0.06 - DEADLINE_MARGIN_SECONDS  # the deadline
    assert hold_seconds(refused, 0.1, 0.005) == 0.0  # no time left: answered at once
    assert hold_seconds(Verdict(False, 1, "TOO_MANY_IN_FLIGHT"), 0.1, None) == 0.0
    assert MIN_HOLD_SECONDS > 0.001
    assert hold_seconds(refused, 0.0, None) == 0.0  # MEDWALLET_LIMIT_HOLD_MS=0: off


class _Aborted(Exception):
    pass


class _Context:
    def time_remaining(self) -> float | None:
        return None

    async def abort_with_status(self, status: object) -> None:
        raise _Aborted(status)


def test_a_refusal_is_remembered_from_when_redis_was_asked_not_when_its_answer_came() -> None:
    """Redis computes its retry delay when it runs the script; the answer reaches the limiter
    later (the round trip, the pipeline's queue, a busy event loop). The memo must not refuse
    past Redis's own delay: 20 ms after Redis looked, the bucket may hold a token again, and a
    reply that took 50 ms to arrive must not make the worker refuse that principal locally."""
    import asyncio

    import grpc

    from authz_server.server.auth import Principal, PrincipalKind
    from authz_server.server.limits import Limiter, Limits, parse_limit

    clock = Clock()
    principal = Principal(PrincipalKind.MERCHANT, merchant_id="m1")

    class Auth:
        def principal(self, context: object) -> Principal:
            return principal

    class Redis:
        asked = 0

        def call_id(self) -> str:
            return "c"

        async def acquire(self, key: str, limit: object, call_id: str) -> Verdict:
            self.asked += 1
            if self.asked == 1:
                clock.now += 0.05  # Redis answered at once; its answer came 50 ms later
                return Verdict(False, 20, "RATE_LIMITED")
            return Verdict(True)

    limit = parse_limit("rate=50,burst=1")
    redis = Redis()
    limiter = Limiter(Auth(), Limits(limit, limit), redis, hold_seconds=0.0)  # type: ignore[arg-type]
    limiter.memo = RefusalMemo(clock)

    async def handler(request: object, context: object) -> str:
        return "served"

    limited = limiter.limited(grpc.unary_unary_rpc_method_handler(handler)).unary_unary
    assert limited is not None

    async def calls() -> None:
        try:
            await limited(None, _Context())  # type: ignore[arg-type]
        except _Aborted:
            pass
        else:
            raise AssertionError("the first call is refused")
        assert await limited(None, _Context()) == "served"  # type: ignore[arg-type]

    asyncio.run(calls())
    assert redis.asked == 2  # the second call was Redis's to judge, not the memo's
