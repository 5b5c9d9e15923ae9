"""The refunds' group commit on PostgreSQL: a database failure is counted once
(medwallet_sql_unavailable_total) and answered UNAVAILABLE. A lock timeout in one unit fails
that unit only (its savepoint); a connection its server ended fails the whole batch, which
answered INTERNAL before (the next unit and the COMMIT met SQLAlchemy's PendingRollbackError:
an audit's test), and a till's retry then refunds once."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from authz_server.domain.errors import Unavailable
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.group_commit import GroupCommit

POSTGRESQL = os.environ.get("TEST_DATABASE_URL")
pytestmark = pytest.mark.skipif(not POSTGRESQL, reason="PostgreSQL (TEST_DATABASE_URL)")


def _count(kind: str) -> float:
    return REGISTRY.get_sample_value("medwallet_sql_unavailable_total", {"kind": kind}) or 0.0


def _counts() -> dict[str, float]:
    return {
        k: _count(k)
        for k in ("deadlock", "lock_timeout", "statement_timeout", "busy", "connection", "other")
    }


def _batch(database: Database, works: list[Any]) -> list[Any]:
    async def scenario() -> list[Any]:
        batch = GroupCommit(database)
        batch.start()
        try:
            return await asyncio.gather(*(batch.submit(w) for w in works), return_exceptions=True)
        finally:
            await batch.stop()

    return asyncio.run(scenario())


def test_a_lock_timeout_in_one_unit_is_counted_once() -> None:
    assert POSTGRESQL
    database = Database(POSTGRESQL, threads=2)
    holder_engine = create_engine(POSTGRESQL)
    try:
        with holder_engine.connect() as holder:
            holder.execute(text("SELECT pg_advisory_lock(515151)"))

            def waits(session: Session) -> None:
                session.execute(text("SET LOCAL lock_timeout = '50ms'"))
                session.execute(text("SELECT pg_advisory_xact_lock(515151)"))

            def fine(session: Session) -> int:
                return int(session.execute(text("SELECT 1")).scalar_one())

            before = _counts()
            results = _batch(database, [waits, fine])
            holder.execute(text("SELECT pg_advisory_unlock(515151)"))
    finally:
        holder_engine.dispose()
        database.close()
    after = _counts()
    assert isinstance(results[0], Unavailable), results
    assert results[1] == 1, results
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"lock_timeout": 1}


def test_a_connection_ended_in_one_unit_is_counted_once_and_answered_unavailable() -> None:
    """Its server ends the batch's connection while a unit runs: the batch's callers are each
    answered UNAVAILABLE (retry), and the one failure counted once."""
    assert POSTGRESQL
    database = Database(POSTGRESQL, threads=2)
    killer_engine = create_engine(POSTGRESQL)
    try:

        def ended(session: Session) -> None:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with killer_engine.connect() as killer:
                killer.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
            session.execute(text("SELECT 1"))

        def fine(session: Session) -> int:
            return int(session.execute(text("SELECT 1")).scalar_one())

        before = _counts()
        results = _batch(database, [fine, ended, fine])
    finally:
        killer_engine.dispose()
        database.close()
    after = _counts()
    print("results:", [repr(r) for r in results])
    print("counted:", {k: after[k] - before[k] for k in after if after[k] != before[k]})
    assert all(isinstance(r, Unavailable) for r in results), results
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"connection": 1}


def test_a_refund_whose_connection_its_server_ended_is_answered_unavailable(
    harness: Any, registry: Any, relationships: Any, authorizations: Any, monkeypatch: Any
) -> None:
    """PostgreSQL ends the refund batch's connection (a restart, a failover, an operator's
    pg_terminate_backend) while a refund's unit runs: the till is told UNAVAILABLE and retries
    with its key (before: INTERNAL, PendingRollbackError from the next unit and the COMMIT),
    and the retry refunds once."""
    import grpc

    from authz_server.storage.sql import records
    from tests.harness import new_id
    from tests.test_authorization_rules import (
        HOSPITAL,
        MEDICAL,
        authorize,
        capture,
        family,
        figures,
        refund,
        register_merchants,
    )

    register_merchants(registry)
    people = family(registry, relationships, 10_000)
    (quota,) = people.relationship_ids
    answer = authorize(authorizations, HOSPITAL, people.beneficiary_id, MEDICAL, 3_000)
    capture(authorizations, HOSPITAL, answer.authorization_id)
    real = records.relationship_row
    killer = create_engine(harness.database_url)
    ended: list[int] = []

    def ending(session: Session, relationship_id: str, *, lock: bool = False) -> Any:
        if not ended:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with killer.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
            ended.append(pid)
        return real(session, relationship_id, lock=lock)

    monkeypatch.setattr(records, "relationship_row", ending)
    key = new_id("refund")
    before = _counts()
    try:
        with pytest.raises(grpc.RpcError) as failed:
            refund(authorizations, HOSPITAL, answer.authorization_id, 1_000, key=key)
    finally:
        killer.dispose()
    after = _counts()
    assert ended
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"connection": 1}
    monkeypatch.setattr(records, "relationship_row", real)
    refund(authorizations, HOSPITAL, answer.authorization_id, 1_000, key=key)
    refund(authorizations, HOSPITAL, answer.authorization_id, 1_000, key=key)  # a replay
    assert figures(relationships, quota) == (8_000, 0, 2_000)
