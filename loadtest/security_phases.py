"""What TLS and the per-principal limiter cost on Authorize, measured in one run:

    python -m loadtest.benchmark --systems security --no-baseline

The service is started three ways on the same data and the same private Redis, one after the
other, each measured on Authorize (uniform workload) with the same load generator, and the three
alternated REPEATS times so drift of a shared machine falls on all of them:

  limiter-off   MEDWALLET_RATE_LIMITS=false, plaintext
  limiter-on    the limiter on (limits far above the load, so it refuses nothing: its cost is
                the Redis round trip per call and the release), plaintext
  tls           the limiter on, and TLS on the port (a certificate from `make-certs`; the load
                generator's tills still present tokens: no client certificate), gRPC's own TLS
  tls-front     the same, TLS terminated by the service's TLS front (server/tls_front.py,
                MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK=call) instead of gRPC's: what the front
                costs per call (with a client CA it also checks the client's certificate, once
                per connection: the tills keep theirs open)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from authz_server.runtime.certificates import make_local_set
from authz_server.runtime.embedded_redis import EmbeddedRedis
from loadtest.benchmark import Run, one_node
from loadtest.variants import Variant, run_variants

REPEATS = 3
VARIANTS: tuple[tuple[str, dict[str, str], bool], ...] = (
    ("limiter-off", {"MEDWALLET_RATE_LIMITS": "false"}, False),
    ("limiter-on", {"MEDWALLET_RATE_LIMITS": "true"}, False),
    ("tls", {"MEDWALLET_RATE_LIMITS": "true"}, True),
    (
        "tls-front",
        {"MEDWALLET_RATE_LIMITS": "true", "MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK": "call"},
        True,
    ),
)


def run_security(run: Run, redis: EmbeddedRedis) -> dict[str, Any]:
    def with_certificates(directory: Path, env: dict[str, str]) -> list[Variant]:
        certificates = directory / "certs"
        make_local_set(certificates, [])
        root = (certificates / "ca.crt").read_bytes()
        tls = {
            "MEDWALLET_TLS_CERT_FILE": str(certificates / "server.crt"),
            "MEDWALLET_TLS_KEY_FILE": str(certificates / "server.key"),
        }
        return [
            replace(variant, settings={**variant.settings, **tls}, tls_root=root)
            if uses_tls
            else variant
            for variant, (_, _, uses_tls) in zip(variants, VARIANTS, strict=True)
        ]

    variants = [Variant(name, settings) for name, settings, _ in VARIANTS]
    return run_variants(
        run, one_node(redis), variants, REPEATS, label="security", prepare=with_certificates
    )
