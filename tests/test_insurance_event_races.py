"""An insurance event dissolves every relationship of the person (POLICY rule 7), also one made
while the event's transaction waited for another writer's row lock (PostgreSQL, READ COMMITTED,
several workers). An audit found that the event's SELECT ... FOR UPDATE of the person's open
relationships saw only the rows of its statement's snapshot, and proposing and consenting did
not wait for the event's lock on the person: a relationship proposed, consented and funded
meanwhile survived the holder's death with its quota (30,000 fen the relative could still
spend, the holder's account short of it, and reporting the death again changed nothing). The
event now reads the relationships again once it holds the person's row, and proposing and
consenting lock the people's rows (service/registry.py report_event)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from authz_server.generated.medwallet.v1 import common_pb2
from tests import factories
from tests.test_insurance_events import DISSOLVED, EVENTS, report

postgresql_only = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL", "").startswith("postgresql"),
    reason="PostgreSQL READ COMMITTED row locks, several writers (SQLite has one at a time)",
)


def death_while_a_row_is_busy(
    harness: Any, registry: Any, relationships: Any
) -> tuple[str, str, Any]:
    """The holder (100,000 fen) shares 10,000 with a first relative. While another writer holds
    that relationship's row (a capture batch, a release waiting on Redis under its lock, ...),
    the holder's death is reported; meanwhile the holder, still active to every other call,
    shares 30,000 with a second relative. Returns (holder, second relationship, the event's
    answer)."""
    holder = factories.employee(registry, 100_000)
    first_relative, second_relative = factories.resident(registry), factories.resident(registry)
    first = factories.active_relationship(relationships, holder, first_relative, 10_000)
    engine = create_engine(harness.app.database.url)
    blocker = engine.connect()
    pool = ThreadPoolExecutor(1)
    try:
        transaction = blocker.begin()
        blocker.execute(
            text("SELECT 1 FROM relationships WHERE relationship_id = :r FOR UPDATE"),
            {"r": first},
        )
        blocker_pid = blocker.execute(text("SELECT pg_backend_pid()")).scalar_one()
        event = pool.submit(report, registry, holder, **EVENTS["death"])
        deadline = time.monotonic() + 20
        with engine.connect() as look:
            while not look.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE :b = ANY(pg_blocking_pids(pid))"),
                {"b": blocker_pid},
            ).scalar_one():
                assert time.monotonic() < deadline, "the event never waited for the row"
                time.sleep(0.02)
        # Nothing of this waits for the event.
        second = factories.active_relationship(relationships, holder, second_relative, 30_000)
        assert factories.balance(registry, holder) == 60_000
        transaction.commit()
        answer = event.result(30)
    finally:
        blocker.close()
        engine.dispose()
        pool.shutdown()
    assert answer.participant.status == common_pb2.PARTICIPANT_STATUS_TERMINATED
    return holder, second, answer


@postgresql_only
def test_relationship_made_while_a_termination_waits_is_dissolved_too(
    harness, registry, relationships
) -> None:
    holder, second, answer = death_while_a_row_is_busy(harness, registry, relationships)
    shown = factories.relationship(relationships, second)
    assert shown.status == DISSOLVED, (
        f"the deceased holder's relationship stays ACTIVE with {shown.available_fen} fen of "
        f"quota (dissolved only {list(answer.dissolved_relationship_ids)})"
    )
    assert factories.balance(registry, holder) == 100_000
