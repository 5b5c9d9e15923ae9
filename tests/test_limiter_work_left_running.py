"""A call whose client gave up (its deadline) while its work runs on to its end (service/
to_the_end.py: the hold journaled, the capture written) still counts against its principal's
calls in flight until that work has ended: the bound is on the work a principal makes the service
do, and a till retrying on timeouts while SQL is slow must not pile up work past it. On a real
Redis, a real server and a real SQL write lock; once the lock goes, every slot is given back."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import create_engine, text

from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
    registry_pb2_grpc,
    relationship_pb2_grpc,
)
from authz_server.storage.redis import keys
from tests import engine_factories as ef
from tests import factories
from tests.harness import Harness, bearer, own_harness

pytestmark = pytest.mark.backend_neutral

MERCHANT, TOKEN = "left-running", "left-running-token"
IN_FLIGHT = 2


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    directory = tmp_path_factory.mktemp("left-running")
    yield from own_harness(
        directory,
        extra_tokens={TOKEN: {"kind": "merchant", "merchant_id": MERCHANT}},
        merchant_limit=f"rate=100000,burst=100000,in_flight={IN_FLIGHT}",
    )


@contextlib.contextmanager
def sql_write_lock(database_url: str) -> Iterator[None]:
    """Every write to the journal waits while this is held (SQLite's write lock; PostgreSQL's
    table lock on the journal)."""
    if database_url.startswith("sqlite"):
        holder = sqlite3.connect(database_url.split(":///", 1)[1], isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            connection.execute(text("LOCK TABLE authorizations IN EXCLUSIVE MODE"))
            try:
                yield
            finally:
                connection.rollback()
    finally:
        engine.dispose()


def reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def test_work_left_running_after_a_deadline_holds_its_slot_until_it_ends(
    harness: Harness,
) -> None:
    with grpc.insecure_channel(harness.address) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        relationships = relationship_pb2_grpc.RelationshipServiceStub(channel)
        ef.merchant(registry, MERCHANT, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
        person = factories.resident(registry)
        holder = factories.employee(registry, balance_fen=100_000)
        factories.active_relationship(relationships, holder, person, 50_000)
        engine = authorization_pb2_grpc.AuthorizationServiceStub(channel)

        outcomes = []
        with sql_write_lock(harness.database_url):
            # A till retrying on its timeouts while SQL is slow: each call's hold is placed and
            # its journal row waits on SQL, past the call's deadline.
            for _ in range(3 * IN_FLIGHT):
                try:
                    engine.Authorize(ef.medical(person, 1), metadata=bearer(TOKEN), timeout=1.0)
                    outcomes.append("OK")
                except grpc.RpcError as error:
                    code = error.code().name
                    outcomes.append(f"{code} {reason(error)}".strip())
        # Only IN_FLIGHT of them were let in: the others were refused before any work, while
        # the work of the first ones still ran.
        assert outcomes[:IN_FLIGHT] == ["DEADLINE_EXCEEDED"] * IN_FLIGHT, outcomes
        assert outcomes[IN_FLIGHT:] == ["RESOURCE_EXHAUSTED TOO_MANY_IN_FLIGHT"] * (
            2 * IN_FLIGHT
        ), outcomes

        # The lock gone, the work ends, and every slot is given back: the till is served again.
        in_flight_key = keys.rate_limit(f"merchant:{MERCHANT}")[1]
        admin = harness.admin()
        try:
            deadline = time.monotonic() + 10
            while admin.zcard(in_flight_key) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert admin.zcard(in_flight_key) == 0
        finally:
            admin.close()
        for _ in range(IN_FLIGHT + 1):
            answer = engine.Authorize(ef.medical(person, 1), metadata=bearer(TOKEN), timeout=10)
            assert answer.decision == authorization_pb2.DECISION_APPROVED


def test_a_slot_is_given_back_once_the_call_and_its_work_have_ended() -> None:
    """The lease a call and its work left running share: given back once, by the last to end."""
    from authz_server.service.to_the_end import Lease

    given_back: list[int] = []
    lease = Lease(lambda: given_back.append(1))
    lease.hold()  # work left running
    lease.end()  # the call
    assert given_back == []
    lease.end()  # the work
    assert given_back == [1]
    lease.hold()  # late: nothing more to give back
    lease.end()
    assert given_back == [1]
