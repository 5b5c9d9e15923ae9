"""The gRPC channel the client uses: keepalive, and a retry policy for UNAVAILABLE only, set
through the gRPC service config.

Only UNAVAILABLE is retried: it means the call was not served, or (a connection dropped after the
request left) may have been; every write carries an idempotency key fixed before the first
attempt, so the server answers a resend with the original answer and never charges twice.
ProposeRelationship has no key, so it is left out of the retry policy (a resend after success
would be refused DUPLICATE_RELATIONSHIP); so are DissolveRelationship and ReportInsuranceEvent,
whose repeat is harmless but answers differently (`returned_fen` 0, no relationship dissolved):
resent after a lost answer, that repeat's answer would be taken for the call's. Every other
method is a keyed write, a repeat answered the same (consent, void, upserts, closing a month),
or a read.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

PACKAGE = "medwallet.v1"
SERVICES = ("AuthorizationService", "RelationshipService", "RegistryService", "SettlementService")
NOT_RETRIED = (
    ("RelationshipService", "ProposeRelationship"),
    ("RelationshipService", "DissolveRelationship"),
    ("RegistryService", "ReportInsuranceEvent"),
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """gRPC-level retries of UNAVAILABLE (in the service config) and the client's own resends.

    `max_attempts` counts the first attempt; gRPC caps it at 5, and 1 turns gRPC retries off.
    After gRPC gives up, the client resends the same request (same idempotency key) up to
    `resends` more times, waiting `resend_backoff_s`, doubling, between them; each resend gets a
    fresh deadline.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    resends: int = 2
    resend_backoff_s: float = 0.5
    # RESOURCE_EXHAUSTED with a RetryInfo (the principal's limit): resent after the delay the
    # server asks for (at most this long), up to this many times, whatever the method.
    limited_resends: int = 3
    max_retry_info_wait_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError("max_attempts must be 1 to 5 (gRPC caps retries at 5 attempts)")
        if self.resends < 0:
            raise ValueError("resends must not be negative")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("backoffs and the multiplier must be positive")


NO_RETRIES = RetryPolicy(max_attempts=1, resends=0)


@dataclass(frozen=True, slots=True)
class Keepalive:
    """HTTP/2 keepalive pings on a connection with calls in flight, so a peer that died
    mid-call is noticed. A stock gRPC server (as this service runs) counts a ping as abusive
    when it comes sooner than 5 minutes after the last data
    (grpc.http2.min_recv_ping_interval_without_data_ms) or with no call open (unless it sets
    grpc.keepalive_permit_without_calls), and answers too many with a too_many_pings GOAWAY; the
    defaults stay inside both rules. Turn `permit_without_calls` on (and shorten `time_ms`)
    only against a server configured to allow it, e.g. to keep idle connections through a NAT."""

    time_ms: int = 310_000
    timeout_ms: int = 20_000
    permit_without_calls: bool = False


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def service_config(retry: RetryPolicy) -> str:
    """The service config JSON: a retryPolicy for UNAVAILABLE on every method of the four
    services except those in NOT_RETRIED (a method-level entry overrides the service-level one)."""
    retried: dict[str, Any] = {"name": [{"service": f"{PACKAGE}.{name}"} for name in SERVICES]}
    if retry.max_attempts > 1:
        retried["retryPolicy"] = {
            "maxAttempts": retry.max_attempts,
            "initialBackoff": _duration(retry.initial_backoff_s),
            "maxBackoff": _duration(retry.max_backoff_s),
            "backoffMultiplier": retry.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    not_retried = {
        "name": [
            {"service": f"{PACKAGE}.{service}", "method": method} for service, method in NOT_RETRIED
        ]
    }
    return json.dumps({"methodConfig": [retried, not_retried]})


def channel_options(
    retry: RetryPolicy, keepalive: Keepalive, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(retry)),
        # Use our config, never one published in DNS TXT records.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.keepalive_time_ms", keepalive.time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
        *extra,
    ]


def is_loopback(address: str) -> bool:
    """Whether a gRPC target ("host:port", "[::1]:port", "dns:///host:port", "ipv4:…",
    "unix:…") names this machine only: localhost, a loopback IP, or a Unix socket."""
    target = address.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target.removeprefix(scheme)
            if scheme in ("ipv4:", "ipv6:"):
                # gRPC takes a list here ("ipv6:[::1]:1,[2001:db8::1]:50051") and connects to
                # any of them: every one must be loopback, not only the first
                return all(_names_loopback(one) for one in target.split(","))
            break
    return "," not in target and _names_loopback(target)


def _names_loopback(target: str) -> bool:
    """Whether one "host:port" (or "[v6]:port", or a bare host) names a loopback host."""
    if target.startswith("["):
        host = target[1 : target.find("]")] if "]" in target else target
    elif target.count(":") == 1:
        host = target.rsplit(":", 1)[0]
    else:
        host = target
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_channel(
    address: str,
    *,
    retry: RetryPolicy | None = None,
    keepalive: Keepalive | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    allow_plaintext: bool = False,
) -> grpc.Channel:
    """A channel to `address` ("host:port"): TLS with `credentials`, plaintext without -- to
    loopback only, unless `allow_plaintext` (the token and the payments would cross the network
    in clear: the README's "Plaintext is for loopback only")."""
    settings = channel_options(retry or RetryPolicy(), keepalive or Keepalive(), options)
    if credentials is None:
        if not allow_plaintext and not is_loopback(address):
            raise ValueError(
                f"plaintext to {address}, not a loopback address: give credentials (TLS), or "
                "allow_plaintext=True where the network is trusted"
            )
        return grpc.insecure_channel(address, options=settings)
    return grpc.secure_channel(address, credentials, options=settings)
