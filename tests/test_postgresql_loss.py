"""PostgreSQL connections lost under load: every connection the service holds is terminated
(pg_terminate_backend, as a failover or a restarted server drops them) while 16 callers
authorize, capture and retry across 50 families; and while the pool holds them idle.

The checks are Redis loss's (tests/test_redis_loss.py): no business decline, no approval lost,
no new decision for a retried key, SQL never holds more captured than allocated, Redis and SQL
agree on every quota at the end, and the service goes on by itself (a call may be answered
UNAVAILABLE meanwhile: the till retries it). On PostgreSQL only (TEST_DATABASE_URL)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from loadtest.benchmark import conninfo
from tests.harness import Harness
from tests.test_redis_loss import check, make_families, run_with_fault, served_stubs

URL = os.environ.get("TEST_DATABASE_URL", "")
pytestmark = pytest.mark.skipif(
    not URL.startswith("postgresql"), reason="terminates PostgreSQL connections"
)
# The service's connections carry this name, so the test terminates them and no one else's
# (other test sessions may share the database).
APPLICATION_NAME = f"mw-loss-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def lossy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    separator = "&" if "?" in URL else "?"
    named = f"{URL}{separator}application_name={APPLICATION_NAME}"
    before = os.environ["TEST_DATABASE_URL"]
    os.environ["TEST_DATABASE_URL"] = named
    try:
        harness = Harness(Path(tmp_path_factory.mktemp("postgresql-loss")))
    finally:
        os.environ["TEST_DATABASE_URL"] = before
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def stubs(lossy: Harness) -> Iterator[Any]:
    yield from served_stubs(lossy)


@pytest.fixture(scope="module")
def families(stubs: Any) -> list[tuple[str, str]]:
    return make_families(stubs)


def terminate_the_services_connections() -> int:
    with psycopg.connect(conninfo(URL), autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            (APPLICATION_NAME,),
        ).fetchall()
    return sum(1 for (terminated,) in rows if terminated)


def test_connections_terminated_under_load(lossy: Harness, stubs: Any, families: Any) -> None:
    terminated: list[int] = []

    def terminate() -> None:
        terminated.append(terminate_the_services_connections())

    tally, before, recovery = run_with_fault(lossy, stubs, families, terminate)
    check(lossy, stubs, "PostgreSQL connections terminated", tally, before, recovery)
    assert terminated[0] > 0  # the fault did strike


def test_connections_terminated_while_idle_are_replaced_unseen(
    lossy: Harness, stubs: Any, families: list[tuple[str, str]]
) -> None:
    """A connection is checked before use (SQLAlchemy's pool_pre_ping, storage/sql/database.py):
    one a restart killed while the pool held it is replaced, and no call sees it."""
    from concurrent.futures import ThreadPoolExecutor

    from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
    from tests.test_authorization_rules import MEDICAL
    from tests.test_redis_loss import HOSPITAL

    _, _, authorizations, _ = stubs

    def authorize(number: int) -> Any:
        beneficiary, _ = families[number % len(families)]
        request = pb.AuthorizeRequest(
            idempotency_key=f"idle-{uuid.uuid4().hex}",
            beneficiary_id=beneficiary,
            purpose=MEDICAL,  # type: ignore[arg-type]
            amount_fen=100,
        )
        return authorizations.Authorize(request, metadata=HOSPITAL, timeout=10)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(authorize, range(64)))  # every connection of the pool used
        time.sleep(1.0)  # nothing in flight
        assert terminate_the_services_connections() > 0
        answers = list(pool.map(authorize, range(64)))  # raises on UNAVAILABLE
    assert all(answer.decision == pb.DECISION_APPROVED for answer in answers)
