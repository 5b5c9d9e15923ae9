"""A rebuild taken over while it empties Redis (its lock expired unnoticed: the process paused,
or its connection stalled so that its lock was not renewed and its UNLINKs were only late)
went on deleting. Its sweep deletes the slots' marks first, then every key a SCAN found: the
keys it names are the earlier generation's, and the rebuild that took over writes the same
names again. Landing after that rebuild had written them, the deletes took its quotas and open
holds away while leaving its marks (written after the first phase): a slot its generation
trusts, the family's quota missing (RELATIONSHIP_NOT_FOUND, or the hold put back gone).

Now a beneficiary slot's keys are deleted only while the slot is unmarked (one script per slot
prefix): once the first phase has run, a mark there is a later rebuild's (or a late page's,
which that rebuild finds)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.runtime.rebuild import RebuildAbandoned, rebuild_hot_state
from authz_server.storage.redis import keys, rebuild_writer
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.quota_cache import RedisQuotaCache
from tests.harness import Harness, own_harness
from tests.test_authorization_rules import family
from tests.test_redis_loss import served_stubs


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    yield from own_harness(tmp_path_factory.mktemp("rebuild-taken-over-sweep"))


def test_a_sweep_taken_over_deletes_nothing_the_later_rebuild_wrote(
    own_server: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = own_server
    stubs = served_stubs(harness)
    registry, relationships, _, _ = next(stubs)
    fam = family(registry, relationships, 20_000)
    stubs.close()
    (relationship_id,) = fam.relationship_ids
    quota = keys.quota(fam.beneficiary_id, relationship_id)
    marker = keys.generation_marker(keys.prefix(fam.beneficiary_id))
    # One SCAN page: the sweep's second phase names every key it found in one write.
    monkeypatch.setattr(rebuild_writer, "SCAN_COUNT", 1_000_000)
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()

    async def scenario() -> tuple[Any, Any, str]:
        # Room for that write: a delete a hash slot, the 16,384 witnesses' among them.
        first = PipelinedRedis.from_url(url, timeout_seconds=5.0, pending_limit=100_000)
        later = PipelinedRedis.from_url(url, timeout_seconds=5.0, pending_limit=100_000)
        paused = asyncio.Event()
        taken_over = asyncio.Event()
        real = first.execute_many

        async def deletes_wait(batch: Any, *arguments: Any) -> Any:
            # The second phase's deletes (they name the quota): held back while another
            # server takes the rebuild over and finishes it.
            if not paused.is_set() and any(quota in map(str, command) for command in batch):
                paused.set()
                await taken_over.wait()
            return await real(batch, *arguments)

        try:
            await rebuild_hot_state(harness.app.database, later, "run", None, harness.clock)
            first.execute_many = deletes_wait  # type: ignore[method-assign]
            earlier = asyncio.ensure_future(
                rebuild_hot_state(harness.app.database, first, "run", None, harness.clock)
            )
            await asyncio.wait_for(paused.wait(), 30)
            report = await rebuild_hot_state(
                harness.app.database, later, "run", None, harness.clock
            )
            taken_over.set()
            with pytest.raises(RebuildAbandoned):
                await earlier
            published = await later.execute("GET", keys.GENERATION)
            assert published == f"{report.generation}|run".encode()
            figures = await RedisQuotaCache(later).figures(fam.beneficiary_id, [relationship_id])
            mark = await later.execute("GET", marker)
            return figures.get(relationship_id), mark, report.generation
        finally:
            await first.aclose()
            await later.aclose()

    try:
        shown, mark, generation = asyncio.run(scenario())
    finally:
        redis.stop()
    assert mark == generation.encode()  # the slot trusted by the published generation
    assert shown is not None, "the quota is gone from a slot its generation trusts"
    assert (shown.available_fen, shown.held_fen) == (20_000, 0)
