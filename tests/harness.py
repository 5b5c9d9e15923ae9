"""Starts the real service for tests: a private redis-server, a real SQL database, and the
gRPC server on a loopback port, on its own event loop in a background thread.

TEST_REDIS_CLUSTER=1: the session's service (tests/conftest.py) runs on a real 3+3 Redis Cluster
on loopback (tests/redis_cluster.py, started once per session) through a redis+cluster:// URL
instead of its private redis-server; tests that need the single redis-server itself are marked
`single_redis` and skip. Other Harnesses (a module's own service) keep a private redis-server:
two services on one cluster would rebuild each other's hot state away."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import create_engine, text

from authz_server.runtime import event_loop
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.server.app import Application
from authz_server.server.tokens import hashed_file
from authz_server.settings import Settings
from authz_server.storage.redis.cluster import is_cluster_url
from authz_server.storage.sql.migrate import upgrade_to_head
from tests.redis_cluster import HOST, RedisClusterHarness

# The switch: the session's service on a real Redis Cluster (see the module's docstring).
CLUSTER = os.environ.get("TEST_REDIS_CLUSTER", "") not in ("", "0")

T = TypeVar("T")

TOKENS = {
    "test-admin": {"kind": "admin"},
    "test-app": {"kind": "channel", "channel": "APP"},
    "test-platform": {"kind": "channel", "channel": "PROVINCIAL_PLATFORM"},
    "test-window": {"kind": "channel", "channel": "SERVICE_WINDOW"},
    "test-merchant-a": {"kind": "merchant", "merchant_id": "merchant-a"},
    "test-merchant-b": {"kind": "merchant", "merchant_id": "merchant-b"},
    # Merchants of the authorization rule, idempotency and recovery tests (one kind each, never
    # re-registered with another): tests/test_authorization_rules.py registers them.
    "test-rules-hospital": {"kind": "merchant", "merchant_id": "rules-hospital"},
    "test-rules-hospital-2": {"kind": "merchant", "merchant_id": "rules-hospital-2"},
    "test-rules-pharmacy": {"kind": "merchant", "merchant_id": "rules-pharmacy"},
    "test-rules-collector": {"kind": "merchant", "merchant_id": "rules-collector"},
    "test-rules-undesignated": {"kind": "merchant", "merchant_id": "rules-undesignated"},
    "test-rules-unregistered": {"kind": "merchant", "merchant_id": "rules-unregistered"},
}


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


ADMIN = bearer("test-admin")
APP = bearer("test-app")
WINDOW = bearer("test-window")


class ManualClock:
    """Real time plus an offset the test can move forward (hold expiry, month edges)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)

    def set(self, moment: datetime) -> None:
        """From now on the clock reads `moment` (and runs on from there)."""
        self.offset = moment - datetime.now(UTC)


def fresh_database(url: str | None, directory: Path) -> str:
    """An empty database at the newest schema: a SQLite file, or on PostgreSQL a schema of its
    own (so concurrent test sessions on one database never see each other)."""
    if not url:
        url = f"sqlite:///{directory / 'test.sqlite3'}"
    else:
        schema = f"test_{uuid.uuid4().hex[:16]}"
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
        engine.dispose()
        separator = "&" if "?" in url else "?"
        url = f"{url}{separator}options=-csearch_path%3D{schema}"
    upgrade_to_head(url)
    return url


def drop_database(url: str) -> None:
    """Drops the private PostgreSQL schema of fresh_database (SQLite files go with tmp_path)."""
    if "csearch_path%3D" not in url:
        return
    schema = url.rsplit("csearch_path%3D", 1)[1]
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


class Harness:
    def __init__(
        self,
        directory: Path,
        extra_tokens: dict[str, dict[str, str]] | None = None,
        redis_cluster: RedisClusterHarness | None = None,
        **settings: Any,
    ) -> None:
        self.directory = directory
        self.redis = EmbeddedRedis(directory / "redis", persistent=False)
        self.redis_cluster = redis_cluster
        external_redis = os.environ.get("TEST_REDIS_URL", "")
        if redis_cluster is not None:
            self.redis_url = cluster_url(redis_cluster)
        else:
            self.redis_url = external_redis or self.redis.start()
        self.database_url = fresh_database(os.environ.get("TEST_DATABASE_URL"), directory)
        tokens = directory / "tokens.json"
        # The server's file holds digests only; the tokens themselves, as a client keeps them
        # (the load tests read these), beside it.
        tokens.write_text(json.dumps(hashed_file({**TOKENS, **(extra_tokens or {})})))
        self.client_tokens = directory / "client-tokens.json"
        self.client_tokens.write_text(json.dumps({**TOKENS, **(extra_tokens or {})}))
        self.settings = replace(
            Settings(),
            grpc_host="127.0.0.1",
            grpc_port=0,
            metrics_port=0,
            data_dir=directory,
            database_url=self.database_url,
            tokens_file=str(tokens),
            # The server's loop as `serve` would choose it (MEDWALLET_EVENT_LOOP=asyncio runs
            # the suite on asyncio's own loop).
            event_loop=os.environ.get("MEDWALLET_EVENT_LOOP", Settings().event_loop),
            # MEDWALLET_LEDGER_WRITER=process runs the suite with a ledger writer process per
            # service (authz_server/ledger/).
            ledger_writer=os.environ.get("MEDWALLET_LEDGER_WRITER", Settings().ledger_writer),
        )
        # Limits far above what any test sends (the limiter runs, refusing nothing), unless the
        # test sets its own.
        unlimited = "rate=1000000,burst=1000000,in_flight=100000"
        # No rolling reconcile unless the test asks for one: it would set right, at any moment,
        # the Redis figures a test makes wrong on purpose to see what notices them.
        settings = {
            "merchant_limit": unlimited,
            "channel_limit": unlimited,
            "reconcile_quotas_per_second": 0,
            **settings,
        }
        # a test's own (tracing=True, TLS files, limits, ...)
        self.settings = replace(self.settings, **settings)
        self.clock = ManualClock()
        self.loop = event_loop.loop_factory(self.settings.event_loop)()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = self.run(self._make_app())
        self.port = self.run(self.app.start())
        self.address = f"127.0.0.1:{self.port}"
        # The tests' own client, to look at Redis or break it (the server has only its
        # pipelined one); on the server's loop: harness.run(harness.client.hget(...)).
        self.client = self.run(self._make_client())

    def _seeds(self) -> list[tuple[str, int]]:
        """The cluster's seed nodes: the harness's cluster, or a redis+cluster:// URL given
        (TEST_REDIS_URL); empty for one node."""
        if self.redis_cluster is not None:
            return [(HOST, port) for port in self.redis_cluster.primary_ports()]
        if not is_cluster_url(self.redis_url):
            return []
        seeds = self.redis_url.partition("://")[2].rpartition("@")[2]
        return [
            (host, int(port)) for host, _, port in (s.rpartition(":") for s in seeds.split(","))
        ]

    async def _make_client(self) -> Redis | RedisCluster:
        seeds = self._seeds()
        if seeds:
            return RedisCluster(startup_nodes=[AsyncClusterNode(h, p) for h, p in seeds])
        return Redis.from_url(self.redis_url)

    def admin(self) -> redis.Redis | redis.RedisCluster:
        """A blocking client of the service's Redis (one node or the cluster), for a test's
        own looks and changes off the server's loop; close it after use."""
        seeds = self._seeds()
        if seeds:
            return redis.RedisCluster(
                startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in seeds]
            )
        return redis.Redis.from_url(self.redis_url)

    async def _make_app(self) -> Application:
        return Application(self.settings, self.redis_url, clock=self.clock)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Runs a coroutine on the server's loop (e.g. a service call, a Redis command)."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.run(self.client.aclose())
        self.run(self.app.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.redis.stop()
        drop_database(self.database_url)


def cluster_url(cluster: RedisClusterHarness) -> str:
    """The service's REDIS_URL for the cluster: its primaries as seed nodes."""
    seeds = ",".join(f"{HOST}:{port}" for port in cluster.primary_ports())
    return f"redis+cluster://{seeds}"


def new_id(prefix: str) -> str:
    """A unique id per test, so tests share one database without seeing each other."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def lose_redis(harness: Harness, seconds: float = 30.0) -> None:
    """FLUSHALL on the server's Redis, then waits until the server has rebuilt the hot state
    from SQL by itself (runtime/hot_state.py) and serves again."""
    import time

    app = harness.app
    before = app.guardian.last_rebuild
    harness.run(harness.client.flushall())
    deadline = time.monotonic() + seconds
    while app.guardian.last_rebuild is before or not app.guardian.ready:
        assert time.monotonic() < deadline, "the hot state was not rebuilt in time"
        time.sleep(0.05)


def own_harness(directory: Path, **settings: Any) -> Iterator[Harness]:
    """A server of a test module's own (the session's is shared), closed after: for a module
    fixture, `yield from own_harness(tmp_path_factory.mktemp(name))`."""
    harness = Harness(directory, **settings)
    try:
        yield harness
    finally:
        harness.close()
