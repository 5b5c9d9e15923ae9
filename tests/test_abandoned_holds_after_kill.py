"""A server killed with -9 while tills authorize, its journal stalled behind SQL's write lock: each
call in flight had its hold placed in Redis and never got its row committed, and the tills
(cancelled at the till) do not retry. Those holds held the families' money until they expired,
SQL knowing nothing. After MEDWALLET_ABANDONED_HOLD_SECONDS the release
(runtime/release_abandoned_holds.py, run here by a second server on the same Redis and SQL)
leaves every hold Redis has journaled, and every quota in Redis as SQL says."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, select, text

from authz_server.generated.medwallet.v1 import authorization_pb2_grpc
from authz_server.runtime.release_abandoned_holds import release_abandoned_holds
from authz_server.server.authorization_handler import authorize_response
from authz_server.storage.redis import keys
from authz_server.storage.redis.unconfirmed_holds import UnconfirmedHolds
from authz_server.storage.sql.tables import AuthorizationRow
from authz_server.storage.sql.writer_lock import sqlite_file
from tests.harness import Harness, own_harness
from tests.operations.server_process import ServerProcess
from tests.test_abandoned_holds import G
from tests.test_authorization_recovery import hot_figures, ledger
from tests.test_authorization_rules import HOSPITAL, MEDICAL, Family, authorize_request, family
from tests.test_redis_loss import assert_redis_equals_sql, served_stubs

TILLS = 6
QUOTA_FEN = 50_000
PAYMENT_FEN = 100


@pytest.fixture(scope="module")
def survivor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """The server that goes on (its rolling reconcile off: the test runs the release)."""
    yield from own_harness(tmp_path_factory.mktemp("abandoned-after-kill"))


@contextmanager
def sql_write_lock(database_url: str) -> Iterator[None]:
    """SQL's journal stalled: on SQLite the file's write lock, on PostgreSQL the journal table
    locked against inserts, held by another connection until the block ends."""
    file = sqlite_file(database_url)
    if file is not None:
        writer = sqlite3.connect(file, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            yield
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        return
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("LOCK TABLE authorizations IN SHARE ROW EXCLUSIVE MODE"))
            yield
    finally:
        engine.dispose()


def tills_paying(address: str, families: list[Family], stop: threading.Event) -> list[Any]:
    """One till per family paying small amounts, each with a new key, a failed call never
    retried (the cashier gave up), a few payments a second (a family's open holds stay within
    what the release reads of a quota each pass): the threads, started."""

    def till(fam: Family) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = authorization_pb2_grpc.AuthorizationServiceStub(channel)
            while not stop.is_set():
                request = authorize_request(fam.beneficiary_id, MEDICAL, PAYMENT_FEN)
                with suppress(grpc.RpcError):
                    stub.Authorize(request, metadata=HOSPITAL, timeout=5)
                time.sleep(0.02)

    threads = [threading.Thread(target=till, args=(fam,)) for fam in families]
    for thread in threads:
        thread.start()
    return threads


def unjournaled_holds(harness: Harness, families: list[Family]) -> list[str]:
    """The authorizations holding money in Redis on the families' quotas that SQL has no row of."""
    client = harness.admin()
    try:
        held = {
            member.decode()
            for fam in families
            for relationship_id in fam.relationship_ids
            for member in client.smembers(keys.quota_holds(fam.beneficiary_id, relationship_id))
            if isinstance(member, bytes)
        }
    finally:
        client.close()
    journaled = set(
        harness.app.database.transaction(
            lambda session: session.scalars(
                select(AuthorizationRow.authorization_id).where(
                    AuthorizationRow.authorization_id.in_(held)
                )
            ).all()
        )
    )
    return sorted(held - journaled)


def released_over_every_quota(harness: Harness, clock: Callable[[], datetime]) -> int:
    app = harness.app
    return harness.run(
        release_abandoned_holds(
            app.database,
            UnconfirmedHolds(app.pipelined_redis),
            "",
            "~",  # after every relationship id
            G,
            authorize_response,
            clock,
        )
    )


def test_holds_left_by_a_server_killed_under_load_are_released_and_redis_equals_sql(
    survivor: Harness, tmp_path: Path
) -> None:
    stubs = served_stubs(survivor)
    registry, relationships, _, _ = next(stubs)
    try:
        families = [family(registry, relationships, QUOTA_FEN) for _ in range(TILLS)]
    finally:
        stubs.close()
    doomed = ServerProcess(
        tmp_path,
        redis_url=survivor.redis_url,
        DATABASE_URL=survivor.database_url,
        MEDWALLET_RECONCILE_QUOTAS_PER_SECOND="0",
        MEDWALLET_LEDGER_WRITER="thread",  # the worker's own journal dies with it
        MEDWALLET_ACCESS_LOG="false",
    )
    stop = threading.Event()
    tills: list[Any] = []
    try:
        doomed.wait_serving()
        tills = tills_paying(doomed.address, families, stop)
        time.sleep(0.5)  # payments made and journaled
        with sql_write_lock(survivor.database_url):
            time.sleep(1.0)  # every till's next call: its hold placed, its row waiting
            doomed.process.kill()
            doomed.process.wait(10)
    finally:
        stop.set()
        for thread in tills:
            thread.join(30)
        doomed.stop()

    left = unjournaled_holds(survivor, families)
    assert left, "the kill left no hold unjournaled: nothing was tested"
    # Not yet: younger than the grace.
    assert released_over_every_quota(survivor, lambda: datetime.now(UTC)) == 0
    assert unjournaled_holds(survivor, families) == left

    late = datetime.now(UTC) + timedelta(seconds=G + 1)
    assert released_over_every_quota(survivor, lambda: late) == len(left)
    assert unjournaled_holds(survivor, families) == []
    assert_redis_equals_sql(survivor)
    for fam in families:
        (relationship_id,) = fam.relationship_ids
        available, held = hot_figures(survivor, fam.beneficiary_id, relationship_id)
        assert available >= 0 and held >= 0
        assert 0 <= ledger(survivor, relationship_id).unused_fen <= QUOTA_FEN
    assert released_over_every_quota(survivor, lambda: late) == 0  # nothing left to release
