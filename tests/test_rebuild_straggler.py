"""A page of an earlier rebuild that reaches Redis after a later rebuild's sweep (its write timed
out and that rebuild was given up, or its lock expired and another server took it over, but the
commands were only late): its slot's mark names the earlier generation, its figures were read
from SQL before money moved.

- Landing after the later rebuild wrote that slot: the first script on it is refused (MWSTALE).
  The slot was taken over with the late figures, and a family could spend a capture's money
  again. Now the hot state is rebuilt from SQL instead.
- Landing between the later rebuild's sweep and its page for that slot: the page overwrote the
  mark, and what else the late page left (a hold closed since) went unseen. Now each page marks
  its slots first with SET ... GET: a mark already there fails the rebuild, and the next one
  sweeps it. A late page's marks lead it, so any part of it that lands carries them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.runtime.rebuild import LatePageFound, rebuild_hot_state
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.quota_cache import RedisQuotaCache
from tests.harness import Harness, own_harness
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    DECLINED,
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
)
from tests.test_redis_loss import served_stubs

EARLIER_GENERATION = "0123456789abcdef"


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A server of its own: the test makes its hot state be rebuilt."""
    yield from own_harness(tmp_path_factory.mktemp("rebuild-straggler"))


def until_served(call: Any, seconds: float = 30.0) -> Any:
    """The till's way: UNAVAILABLE is retried (the hot state is being rebuilt)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_late_page_of_an_earlier_rebuild_is_not_decided_on(own_server: Harness) -> None:
    harness = own_server
    stubs = served_stubs(harness)
    registry, relationships, authorizations, _ = next(stubs)
    try:
        fam = family(registry, relationships, 20_000)
        (relationship_id,) = fam.relationship_ids
        held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
        assert held.decision == APPROVED
        assert capture(authorizations, HOSPITAL, held.authorization_id).status == CAPTURED
        assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
        rebuilt_before = harness.app.guardian.last_rebuild

        # The earlier rebuild's page lands: the quota as SQL had it before the capture, and the
        # slot's mark of that rebuild's generation.
        client = harness.admin()
        try:
            client.hset(keys.quota(fam.beneficiary_id, relationship_id), "available", 20_000)
            client.set(keys.generation_marker(keys.prefix(fam.beneficiary_id)), EARLIER_GENERATION)
        finally:
            client.close()

        again = until_served(
            lambda: authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 12_000)
        )
        assert again.decision == DECLINED  # 8,000 left, not the 20,000 of the late page
        assert harness.app.guardian.last_rebuild is not rebuilt_before  # rebuilt from SQL
        assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (8_000, 0)
    finally:
        stubs.close()


def test_a_rebuild_that_finds_a_late_page_in_a_swept_slot_starts_again(
    own_server: Harness, tmp_path: Path
) -> None:
    """The rebuild runs against a Redis of its own (the server's guardian stays out of it), from
    the server's SQL: the late page lands just before this rebuild's page marks its slot."""
    harness = own_server
    stubs = served_stubs(harness)
    registry, relationships, _, _ = next(stubs)
    fam = family(registry, relationships, 20_000)
    stubs.close()
    (relationship_id,) = fam.relationship_ids
    quota = keys.quota(fam.beneficiary_id, relationship_id)
    marker = keys.generation_marker(keys.prefix(fam.beneficiary_id))
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()

    async def scenario() -> Any:
        commands = PipelinedRedis.from_url(url, timeout_seconds=5.0)
        real = commands.execute_many
        landed: list[str] = []

        async def late_page_lands(batch: Any, *arguments: Any) -> Any:
            if not landed and any(tuple(command[:2]) == ("SET", marker) for command in batch):
                landed.append(marker)
                await real([("SET", marker, EARLIER_GENERATION), ("HSET", quota, "held", 0)])
            return await real(batch, *arguments)

        commands.execute_many = late_page_lands  # type: ignore[method-assign]
        try:
            with pytest.raises(LatePageFound):
                await rebuild_hot_state(harness.app.database, commands, "run", None, harness.clock)
            assert landed == [marker]
            # the guardian's next look: a new rebuild, whose sweep takes the late page away
            report = await rebuild_hot_state(
                harness.app.database, commands, "run", None, harness.clock
            )
            figures = await RedisQuotaCache(commands).figures(fam.beneficiary_id, [relationship_id])
            mark = await real([("GET", marker)])
            return report, figures[relationship_id], mark[0]
        finally:
            await commands.aclose()

    try:
        report, figures, mark = asyncio.run(scenario())
    finally:
        redis.stop()
    assert (figures.available_fen, figures.held_fen) == (20_000, 0)
    assert mark == report.generation.encode()


# Two beneficiary ids whose slot tags are the same 32-bit digest (keys.tag_digest): found by a
# birthday search over "res-tag-<n>"; at 100,000 beneficiaries some pairs always share one.
SHARING_A_TAG = ("res-tag-31409", "res-tag-98338")


def test_beneficiaries_sharing_a_tag_in_two_pages_are_no_late_page(
    own_server: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second page finds the slot marked by the first page of the same rebuild: that is
    no late page (else every rebuild of a province's data would fail, and start again, forever)."""
    from authz_server.generated.medwallet.v1 import common_pb2, registry_pb2
    from authz_server.runtime import rebuild
    from tests import factories
    from tests.harness import ADMIN

    harness = own_server
    assert len({keys.prefix(beneficiary_id) for beneficiary_id in SHARING_A_TAG}) == 1
    stubs = served_stubs(harness)
    registry, relationships, _, _ = next(stubs)
    for beneficiary_id in SHARING_A_TAG:
        registry.UpsertParticipant(
            registry_pb2.UpsertParticipantRequest(
                participant_id=beneficiary_id,
                scheme=common_pb2.SCHEME_RESIDENT,
                pooling_region="440300",
            ),
            metadata=ADMIN,
        )
        holder = factories.employee(registry, balance_fen=30_000)
        factories.active_relationship(relationships, holder, beneficiary_id, 10_000)
    stubs.close()
    monkeypatch.setattr(rebuild, "BENEFICIARIES_PER_PAGE", 1)  # each in a page of its own
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()

    async def scenario() -> Any:
        commands = PipelinedRedis.from_url(url, timeout_seconds=5.0)
        try:
            return await rebuild_hot_state(
                harness.app.database, commands, "run", None, harness.clock
            )
        finally:
            await commands.aclose()

    try:
        report = asyncio.run(scenario())
    finally:
        redis.stop()
    assert report.beneficiaries >= 2


def test_a_rebuild_taken_over_writes_no_page_more(
    own_server: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another server takes the rebuild over (this one's lock expired, unnoticed until its next
    renewal): this rebuild stops before its next page. Each page it wrote after the other's
    sweep would be a late page there, and cost that rebuild a start more. One page in flight
    here: with more, each of those already read may land (at most PAGES_IN_FLIGHT)."""
    from authz_server.runtime import rebuild
    from authz_server.runtime.rebuild import RebuildAbandoned
    from authz_server.storage.redis.generation import REBUILDING

    harness = own_server
    stubs = served_stubs(harness)
    registry, relationships, _, _ = next(stubs)
    for amount_fen in (10_000, 20_000, 30_000):  # three beneficiaries at least
        family(registry, relationships, amount_fen)
    stubs.close()
    monkeypatch.setattr(rebuild, "BENEFICIARIES_PER_PAGE", 1)
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()
    taken_over = f"{REBUILDING}|{EARLIER_GENERATION}"

    async def scenario() -> int:
        commands = PipelinedRedis.from_url(url, timeout_seconds=5.0)
        real = commands.execute_many
        pages: list[object] = []

        async def first_page_then_taken_over(batch: Any, *arguments: Any) -> Any:
            replies = await real(batch, *arguments)
            if any(command[0] == "SET" and command[-1] == "GET" for command in batch):
                pages.append(batch)  # a page: its slot marks go first, SET ... GET
                if len(pages) == 1:  # the other server marks its own rebuild
                    await real([("SET", keys.GENERATION, taken_over)])
            return replies

        commands.execute_many = first_page_then_taken_over  # type: ignore[method-assign]
        try:
            with pytest.raises(RebuildAbandoned):
                await rebuild_hot_state(
                    harness.app.database, commands, "run", None, harness.clock, pages_in_flight=1
                )
            assert await commands.execute("GET", keys.GENERATION) == taken_over.encode()
            return len(pages)
        finally:
            await commands.aclose()

    try:
        pages_written = asyncio.run(scenario())
    finally:
        redis.stop()
    assert pages_written == 1
