"""The rebuild's pages read and written several at once (runtime/rebuild.py PAGES_IN_FLIGHT): on
PostgreSQL each on its own connection, so a province's rebuild is not one page after another.

- The pages commute: a rebuild with four pages in flight leaves Redis exactly as one with a page
  at a time does (every key and value, bar the generation's own tokens), over families with open
  holds, split holds, a captured hold and a dissolved quota, with pages of two beneficiaries.
- A failing page ends the rebuild only once the pages in flight beside it have ended: none is
  still read or written after the rebuild returned (the next rebuild's sweep must come after),
  and no page is begun once it failed (the pages already handed to a SQL thread return unread).
- The pages write to Redis in turn: the rebuild keeps no more commands in flight on the
  connection the calls share than one page did (its bound on pending commands)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from authz_server.runtime import rebuild
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.runtime.rebuild import LatePageFound, rebuild_hot_state
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import PipelinedRedis
from tests.harness import Harness, own_harness
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
)
from tests.test_redis_loss import served_stubs


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    yield from own_harness(tmp_path_factory.mktemp("rebuild-pages"))


@pytest.fixture(scope="module")
def families(own_server: Harness) -> int:
    """Twelve beneficiaries with open holds (some split over two quotas), a captured one and a
    dissolved quota: how many beneficiaries."""
    from authz_server.generated.medwallet.v1 import common_pb2, relationship_pb2
    from tests.harness import APP

    stubs = served_stubs(own_server)
    registry, relationships, authorizations, _ = next(stubs)
    try:
        for number in range(12):
            fam = family(registry, relationships, 10_000 + number, 5_000)
            if number == 5:  # its second quota dissolved before anything was held
                relationships.DissolveRelationship(
                    relationship_pb2.DissolveRelationshipRequest(
                        relationship_id=fam.relationship_ids[1], party=common_pb2.PARTY_BENEFICIARY
                    ),
                    metadata=APP,
                )
            else:
                held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
                assert held.decision == APPROVED  # over the first quota: split over both
            small = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 300)
            assert small.decision == APPROVED
            if number == 3:
                assert capture(authorizations, HOSPITAL, small.authorization_id).status == CAPTURED
    finally:
        stubs.close()
    return 12


def _redis_state(url: str) -> dict[str, Any]:
    """Every key of the hot state with its value, bar what differs by generation and page: the
    slots' generation marks and witnesses (the generation's token), a quota's epoch `e` (random a
    page: quota_io.quota_fields) and keys.GENERATION itself."""
    import redis as redis_py

    client = redis_py.Redis.from_url(url)
    state: dict[str, Any] = {}
    try:
        for name in client.scan_iter(count=1000):
            key = name.decode()
            kind = client.type(name).decode()
            if key == keys.GENERATION or kind == "string":
                continue  # marks, witnesses, cursors: values of the generation or the clock
            if kind == "hash":
                value: Any = {
                    field.decode(): data.decode()
                    for field, data in client.hgetall(name).items()
                    if not (field == b"e" and ":q:" in key)
                }
            elif kind == "zset":
                value = client.zrange(name, 0, -1, withscores=True)
            elif kind == "set":
                value = sorted(client.smembers(name))
            else:
                value = kind
            state[key] = value
    finally:
        client.close()
    return state


def _rebuild(
    harness: Harness, url: str, pages_in_flight: int, moment: datetime, **redis_options: Any
) -> rebuild.RebuildReport:
    """A rebuild into the Redis at `url`, from the server's SQL, its clock stopped at `moment`
    (the holds put back carry the rebuild's time: the same in every page and every run)."""

    async def scenario() -> rebuild.RebuildReport:
        commands = PipelinedRedis.from_url(url, timeout_seconds=5.0, **redis_options)
        try:
            return await rebuild_hot_state(
                harness.app.database, commands, "run", None, lambda: moment, pages_in_flight
            )
        finally:
            await commands.aclose()

    return asyncio.run(scenario())


class PagesSeen:
    """Counts the pages running at once (wraps rebuild._page)."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        fail_page: int | None = None,
        together: threading.Barrier | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.running = self.most = self.started = self.ended = 0
        self.fail_page = fail_page
        self.failed_at: int | None = None
        self.started_after_failure = 0
        real = rebuild._page

        def page(*arguments: Any) -> Any:
            with self.lock:
                self.started += 1
                number = self.started
                self.running += 1
                self.most = max(self.most, self.running)
                if self.failed_at is not None:
                    self.started_after_failure += 1
            try:
                if together is not None:
                    with contextlib.suppress(threading.BrokenBarrierError):
                        together.wait()  # the pages read, and reach Redis, at once
                else:
                    time.sleep(0.05)  # long enough for the others to begin beside it
                if number == self.fail_page:
                    with self.lock:
                        self.failed_at = number
                    raise LatePageFound("a slot marked since the sweep (the test's)")
                return real(*arguments)
            finally:
                with self.lock:
                    self.running -= 1
                    self.ended += 1

        monkeypatch.setattr(rebuild, "_page", page)


def test_pages_in_flight_leave_redis_as_one_page_at_a_time_does(
    own_server: Harness, families: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rebuild, "BENEFICIARIES_PER_PAGE", 2)
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()
    try:
        moment = own_server.clock()
        one_at_a_time = _rebuild(own_server, url, 1, moment)
        expected = _redis_state(url)
        seen = PagesSeen(monkeypatch)
        four = _rebuild(own_server, url, 4, moment)
        got = _redis_state(url)
    finally:
        redis.stop()
    assert one_at_a_time.beneficiaries >= families
    assert (four.beneficiaries, four.quotas, four.open_holds) == (
        one_at_a_time.beneficiaries, one_at_a_time.quotas, one_at_a_time.open_holds,
    )  # fmt: skip
    assert one_at_a_time.open_holds >= 2 * families - 2  # one captured, one never split
    assert got == expected
    assert seen.started == seen.ended >= families // 2
    if own_server.app.database.is_sqlite:
        assert seen.most == 1  # one SQL thread: its pages still go one at a time
    else:
        assert seen.most > 1, "no two pages were in flight at once"


def test_a_failed_page_ends_the_rebuild_after_the_pages_beside_it(
    own_server: Harness, families: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rebuild, "BENEFICIARIES_PER_PAGE", 1)
    seen = PagesSeen(monkeypatch, fail_page=1)
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()
    try:
        with pytest.raises(LatePageFound):
            _rebuild(own_server, url, 4, own_server.clock())
        running_when_it_ended = seen.running
        started_when_it_ended = seen.started
        time.sleep(0.3)  # a page still running, or begun, would show now
    finally:
        redis.stop()
    assert running_when_it_ended == 0
    assert seen.started == seen.ended == started_when_it_ended
    assert seen.failed_at == 1
    # those handed to a SQL thread beside it (with one SQL thread: queued behind it) return
    # before they read or write anything (called, the wrapper counts them: none may be)
    assert seen.started_after_failure == 0
    assert seen.started < families


def test_the_pages_write_to_redis_in_turn(
    own_server: Harness, families: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scaled down: 6 commands a write and a connection that takes 8 in flight (a page's write
    and its check that the rebuild is still its own). Four pages reaching Redis together would
    put 24 there: each must wait for its turn instead."""
    monkeypatch.setattr(rebuild, "BENEFICIARIES_PER_PAGE", 1)
    monkeypatch.setattr(rebuild, "COMMANDS_PER_WRITE", 6)
    pages = 4 if not own_server.app.database.is_sqlite else 1
    seen = PagesSeen(monkeypatch, together=threading.Barrier(pages, timeout=2))
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()
    try:
        report = _rebuild(own_server, url, 4, own_server.clock(), pending_limit=8)
    finally:
        redis.stop()
    assert report.beneficiaries >= families
    if not own_server.app.database.is_sqlite:
        assert seen.most == 4, "the pages did not reach Redis together"


def test_a_page_that_waited_for_a_lock_reads_the_marks_of_the_totals_it_got(
    own_server: Harness, families: int, tmp_path: Path
) -> None:
    """PostgreSQL (READ COMMITTED): a top-up's transaction holds a quota's row while it adds to
    its totals and writes the ledger entry; the page's locked read waits for it. The quota is
    written with the top-up counted, so its mark must name the top-up's entry: else its credit,
    sent to Redis after the rebuild (quota_credit.lua: applied unless the mark has it), would
    count the money twice (a refund's likewise). SQLite's writers take turns: nothing waits."""
    from sqlalchemy import create_engine, update
    from sqlalchemy.orm import Session

    from authz_server.domain.types import LedgerKind
    from authz_server.storage.sql.tables import LedgerEntryRow, RelationshipRow

    if own_server.app.database.is_sqlite:
        pytest.skip("SQLite's writers take turns: no locked read waits for a commit")
    stubs = served_stubs(own_server)
    registry, relationships, _, _ = next(stubs)
    try:
        fam = family(registry, relationships, 7_000)
    finally:
        stubs.close()
    (relationship_id,) = fam.relationship_ids
    engine = create_engine(own_server.app.database.engine.url)
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()
    outcome: list[object] = []
    try:
        with Session(engine) as top_up, top_up.begin():
            top_up.execute(
                update(RelationshipRow)
                .where(RelationshipRow.relationship_id == relationship_id)
                .values(allocated_total_fen=RelationshipRow.allocated_total_fen + 500)
            )
            entry = LedgerEntryRow(
                kind=LedgerKind.QUOTA_ALLOCATION.value,
                holder_id=fam.holder_ids[0],
                relationship_id=relationship_id,
                amount_fen=500,
                created_at=own_server.clock(),
            )
            top_up.add(entry)
            top_up.flush()
            rebuilding = threading.Thread(
                target=lambda: outcome.append(_rebuild(own_server, url, 4, own_server.clock()))
            )
            rebuilding.start()
            time.sleep(1.0)  # the page reaches the quota's row and waits for its lock
            assert rebuilding.is_alive(), outcome
            top_up_entry = entry.entry_id
        rebuilding.join(30)
        import redis as redis_py

        client = redis_py.Redis.from_url(url)
        try:
            written = client.hmget(
                keys.quota(fam.beneficiary_id, relationship_id), "r", "available"
            )
        finally:
            client.close()
    finally:
        redis.stop()
        engine.dispose()
    assert outcome and isinstance(outcome[0], rebuild.RebuildReport), outcome
    assert written == [str(top_up_entry).encode(), b"7500"]


def test_a_rebuild_says_how_far_it_has_got(
    own_server: Harness,
    families: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A province's rebuild takes minutes: the gauges and a log line a page here (every 10 s in
    service) say how many beneficiaries are written, of how many, and the time left."""
    import logging

    from prometheus_client import REGISTRY

    from authz_server.runtime import rebuild_progress

    def gauge(state: str) -> float | None:
        return REGISTRY.get_sample_value(
            "medwallet_hot_state_rebuild_beneficiaries", {"state": state}
        )

    monkeypatch.setattr(rebuild, "BENEFICIARIES_PER_PAGE", 2)
    monkeypatch.setattr(rebuild_progress, "PROGRESS_LOG_SECONDS", 0.0)
    started = PagesSeen(monkeypatch, together=None)  # pages of 50 ms: the count ends first
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()
    try:
        with caplog.at_level(logging.WARNING, logger=rebuild_progress.__name__):
            report = _rebuild(own_server, url, 4, own_server.clock())
    finally:
        redis.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == rebuild_progress.__name__]
    assert started.started == len(lines) >= families // 2
    assert report.beneficiaries >= families
    assert gauge("done") == report.beneficiaries
    assert gauge("total") == report.beneficiaries  # nothing related since the count
    assert f"{report.beneficiaries:,} beneficiaries" in lines[-1]
    assert f"100% of {report.beneficiaries:,}, about 0 s left" in lines[-1], lines[-1]
    assert any("% of" in line and "s left" in line for line in lines[:-1]), lines


def test_pages_waiting_for_their_turn_are_not_written_once_a_write_failed(
    own_server: Harness, families: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page's write times out while the next pages, read under their locks, wait for their
    turn: they are not sent (each would wait out its own timeout, and the failed write's
    commands may still be running on Redis), and the rebuild raises the timeout, not what it
    stopped. (A helper's audit found them written.)"""
    if own_server.app.database.is_sqlite:
        pytest.skip("one SQL thread: no page waits for its turn beside another")
    monkeypatch.setattr(rebuild, "BENEFICIARIES_PER_PAGE", 1)
    real_write = rebuild._write
    after_failure: list[object] = []
    failed_once: list[bool] = []

    async def write(redis: Any, commands: Any, *rest: Any) -> Any:
        if any(command[0] == "HSET" for command in commands):  # a page, not the witnesses
            if not failed_once:
                failed_once.append(True)
                await asyncio.sleep(0.3)  # the next pages reach their turn meanwhile
                raise TimeoutError("Redis did not answer in time (the test's)")
            after_failure.append(commands)
        return await real_write(redis, commands, *rest)

    monkeypatch.setattr(rebuild, "_write", write)
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()
    try:
        with pytest.raises(TimeoutError):
            _rebuild(own_server, url, 4, own_server.clock())
    finally:
        redis.stop()
    assert failed_once
    assert after_failure == [], f"{len(after_failure)} page(s) written after a write failed"


def test_a_cancelled_rebuild_begins_no_page_more(
    own_server: Harness, families: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server stopping cancels its rebuild: the pages handed to a SQL thread but not begun
    (SQLite: queued behind the one thread) do not begin; those begun are waited out."""
    monkeypatch.setattr(rebuild, "BENEFICIARIES_PER_PAGE", 1)
    real = rebuild._page
    begun: list[float] = []

    def page(*arguments: Any) -> Any:
        begun.append(time.monotonic())
        time.sleep(0.2)
        return real(*arguments)

    monkeypatch.setattr(rebuild, "_page", page)
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()
    cancelled_at: list[float] = []

    async def scenario() -> None:
        commands = PipelinedRedis.from_url(url, timeout_seconds=5.0)
        try:
            task = asyncio.ensure_future(
                rebuild_hot_state(
                    own_server.app.database, commands, "run", None, own_server.clock, 4
                )
            )
            while not begun:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            task.cancel()
            cancelled_at.append(time.monotonic())
            with pytest.raises(asyncio.CancelledError):
                await task
            ended_at = time.monotonic()
            assert all(moment < ended_at for moment in begun)
        finally:
            await commands.aclose()

    try:
        asyncio.run(scenario())
    finally:
        redis.stop()
    later = [moment for moment in begun if moment > cancelled_at[0]]
    assert later == [], f"{len(later)} page(s) begun after the rebuild was cancelled"
