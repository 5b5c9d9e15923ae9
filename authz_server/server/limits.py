"""Limits per principal: a rate (calls per second with a burst) and a bound on calls in flight
for each merchant and each channel, shared by every worker and pod through Redis
(storage/redis/rate_limiter.py). Admin is not limited. Beyond a limit the call is answered
RESOURCE_EXHAUSTED with a google.rpc.RetryInfo saying when to try again, before the handler
runs: nothing is read or written for it (no money moves).

The limiter sits outside the audit trail, the metrics and the access log: a principal flooding
the service costs no SQL row or log line, and at most one Redis round trip per refused call: a
principal refused for its rate is refused by this process, without asking Redis, until the
RetryInfo delay Redis gave has passed (RefusalMemo: its bucket cannot hold a token before then,
whatever the other workers do). A refused call is held before its answer for part of its
retry delay (Limiter._refuse, MEDWALLET_LIMIT_HOLD_MS): a till retrying in a tight loop is slowed
to a few dozen calls a second. Refusals are counted in
medwallet_rate_limited_total{principal_kind} (MedWalletPrincipalRateLimited alerts).
If Redis does not answer the limiter lets the call through (what needs Redis fails on its own,
UNAVAILABLE) rather than failing calls that only need SQL.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from authz_server.domain import validation
from authz_server.domain.errors import InvalidArgument
from authz_server.domain.types import Channel
from authz_server.observability import metrics
from authz_server.server.auth import Authenticator, Principal, PrincipalKind
from authz_server.server.errors import DOMAIN
from authz_server.server.wrapped_server import Handler, WrappedServer
from authz_server.service.to_the_end import Lease, call_lease
from authz_server.settings import limit_fields
from authz_server.storage.redis.rate_limiter import Limit, RedisRateLimiter, Verdict

log = logging.getLogger(__name__)


def parse_limit(text: str) -> Limit:
    """ "rate=200,burst=400,in_flight=100" -> Limit; a ValueError for anything else
    (settings.limit_fields: a misspelt field is not a bound silently left out)."""
    return Limit(*limit_fields(text))


def _names_a_principal(key: str) -> bool:
    """Whether a limits file's key is one principal_key makes (any other would never match):
    merchant:<a merchant id, as the registry takes it> or channel:<a channel>."""
    kind, _, name = key.partition(":")
    if kind == "channel":
        return name in {channel.value for channel in Channel}
    if kind != "merchant":
        return False
    try:
        validation.identifier("merchant_id", name)
    except InvalidArgument:
        return False
    return True


@dataclass(frozen=True)
class Limits:
    merchant: Limit
    channel: Limit
    # "merchant:<id>" or "channel:<name>" -> its own limit
    principals: Mapping[str, Limit] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, merchant: str, channel: str, file: str) -> Limits:
        principals: dict[str, Limit] = {}
        if file:
            document = json.loads(Path(file).read_text())
            for key, value in document.items():
                try:
                    if not _names_a_principal(key):
                        raise ValueError("not merchant:<id> or channel:<channel>")
                    if not isinstance(value, str):
                        raise ValueError("not a string like 'rate=50,burst=100,in_flight=20'")
                    principals[key] = parse_limit(value)
                except ValueError as error:
                    raise ValueError(f"limits file {file}: {key!r}: {error}") from None
        return cls(parse_limit(merchant), parse_limit(channel), principals)

    def of(self, key: str, principal: Principal) -> Limit:
        own = self.principals.get(key)
        if own is not None:
            return own
        return self.merchant if principal.kind is PrincipalKind.MERCHANT else self.channel


def principal_key(principal: Principal) -> str:
    if principal.kind is PrincipalKind.MERCHANT:
        return f"merchant:{principal.merchant_id}"
    return f"channel:{principal.channel.value if principal.channel else ''}"


def exhausted(verdict: Verdict) -> grpc.Status:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(1, verdict.retry_after_ms))
    info, retry = any_pb2.Any(), any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=verdict.reason, domain=DOMAIN))
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    message = (
        "too many calls in flight for this principal"
        if verdict.reason == "TOO_MANY_IN_FLIGHT"
        else "over this principal's rate"
    )
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.RESOURCE_EXHAUSTED,
            message=f"{message}; retry in {verdict.retry_after_ms} ms",
            details=[info, retry],
        )
    )
    return status


class RefusalMemo:
    """Principals refused for their rate, and until when (monotonic seconds): a bucket that had
    less than a token when Redis last looked cannot have one before the delay Redis gave, as
    other workers only take tokens. A refusal for calls in flight is not remembered (a slot may
    free at any moment)."""

    # a flood of distinct principals cannot grow it past this: expired entries go first, then all
    MAX_ENTRIES = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.until: dict[str, float] = {}

    def remember(self, key: str, verdict: Verdict, asked_at: float | None = None) -> None:
        """`asked_at`: when Redis was asked (this clock): its delay runs from when it looked,
        not from when its answer arrived (the round trip, a busy event loop)."""
        if verdict.reason != "RATE_LIMITED" or verdict.retry_after_ms <= 0:
            return
        if len(self.until) >= self.MAX_ENTRIES:
            now = self.clock()
            self.until = {k: t for k, t in self.until.items() if t > now}
            if len(self.until) >= self.MAX_ENTRIES:
                self.until.clear()
        since = self.clock() if asked_at is None else asked_at
        self.until[key] = since + verdict.retry_after_ms / 1000

    def refusal(self, key: str) -> Verdict | None:
        """The refusal to answer without asking Redis, or None (ask it)."""
        until = self.until.get(key)
        if until is None:
            return None
        left_ms = math.ceil((until - self.clock()) * 1000)
        if left_ms <= 0:
            del self.until[key]
            return None
        return Verdict(False, left_ms, "RATE_LIMITED")


# Refused calls held at once by one process at most; beyond, refusals are answered at once.
MAX_HELD_CALLS = 1000
# A hold shorter than this is not worth a timer; one is cut this much short of the deadline.
MIN_HOLD_SECONDS = 0.002
DEADLINE_MARGIN_SECONDS = 0.01


def hold_seconds(verdict: Verdict, most_seconds: float, time_remaining: float | None) -> float:
    """How long to hold a refused call before answering it: within its retry delay, at most
    `most_seconds`, ending DEADLINE_MARGIN_SECONDS before its deadline; 0 below
    MIN_HOLD_SECONDS."""
    hold = min(most_seconds, verdict.retry_after_ms / 1000)
    if time_remaining is not None:
        hold = min(hold, time_remaining - DEADLINE_MARGIN_SECONDS)
    return hold if hold >= MIN_HOLD_SECONDS else 0.0


class Limiter:
    def __init__(
        self,
        auth: Authenticator,
        limits: Limits,
        redis: RedisRateLimiter,
        hold_seconds: float = 0.1,
    ) -> None:
        self.auth = auth
        self.limits = limits
        self.redis = redis
        self.memo = RefusalMemo()
        self.hold_seconds = hold_seconds
        self.held = 0  # refused calls being held now
        self.refused = {kind: metrics.rate_limited.labels(kind.value) for kind in PrincipalKind}
        self.checked = metrics.rate_limit_check_seconds

    def limited(self, handler: Handler) -> Handler:
        if handler.unary_unary is None:
            return handler
        call = handler.unary_unary

        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                principal = self.auth.principal(context)
            except Exception:  # the handler answers it (UNAUTHENTICATED)
                principal = None
            if principal is None or principal.kind is PrincipalKind.ADMIN:
                return await call(request, context)  # type: ignore[arg-type]
            key = principal_key(principal)
            limit = self.limits.of(key, principal)
            remembered = self.memo.refusal(key)
            if remembered is not None:
                await self._refuse(context, principal.kind, remembered)
            call_id = self.redis.call_id()
            asked_at = self.memo.clock()
            try:
                verdict = await self.redis.acquire(key, limit, call_id)
            except Exception as error:  # Redis not answering: let it through
                log.debug("limiter not answering: %r", error)
                return await call(request, context)  # type: ignore[arg-type]
            finally:
                self.checked.observe(self.memo.clock() - asked_at)
            if not verdict.admitted:
                self.memo.remember(key, verdict, asked_at)
                await self._refuse(context, principal.kind, verdict)
            if not limit.max_in_flight:
                return await call(request, context)  # type: ignore[arg-type]
            # The slot is given back when the call has ended and so has any work of it left
            # running past its cancellation (service/to_the_end.py: a deadline does not stop
            # the work, so it does not free the slot either). Not waited for: freed by the
            # principal's next admission (or within RELEASE_FLUSH_SECONDS).
            lease = Lease(functools.partial(self.redis.release, key, call_id))
            leased = call_lease.set(lease)
            try:
                return await call(request, context)  # type: ignore[arg-type]
            finally:
                call_lease.reset(leased)
                lease.end()

        return grpc.unary_unary_rpc_method_handler(
            limited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _refuse(
        self, context: grpc.aio.ServicerContext[Any, Any], kind: PrincipalKind, verdict: Verdict
    ) -> None:
        """Answers RESOURCE_EXHAUSTED (raises), after holding the call for part of its retry
        delay: a client that waits as RetryInfo asks loses nothing (the delay it is told is
        shortened by the hold), one that retries at once is slowed to a few calls a second,
        and the calls of other principals keep the CPU a flood would take. Bounded: at most
        hold_seconds, never past the call's deadline, at most MAX_HELD_CALLS at once."""
        self.refused[kind].inc()
        hold = hold_seconds(verdict, self.hold_seconds, context.time_remaining())
        if hold and self.held < MAX_HELD_CALLS:
            self.held += 1
            try:
                await asyncio.sleep(hold)
            finally:
                self.held -= 1
            left_ms = max(1, verdict.retry_after_ms - round(hold * 1000))
            verdict = replace(verdict, retry_after_ms=left_ms)
        await context.abort_with_status(exhausted(verdict))

    async def stop(self) -> None:
        await self.redis.stop()


LIMITED_SERVICE_PREFIX = "medwallet.v1."


class LimitedServer(WrappedServer):
    """A grpc.aio.Server (or a wrapper) whose medwallet.v1 unary handlers are limited."""

    def __init__(self, server: grpc.aio.Server, limiter: Limiter) -> None:
        super().__init__(server)
        self.limiter = limiter

    def wrap(self, full_method: str, handler: Handler) -> Handler:
        if not full_method.lstrip("/").startswith(LIMITED_SERVICE_PREFIX):
            return handler
        return self.limiter.limited(handler)
