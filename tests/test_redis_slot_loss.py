"""A Redis hash slot that lost its data while keys.GENERATION still names a complete generation
(on a Redis Cluster: a shard emptied, keys.GENERATION on another). Its slots' generation markers
are gone, so scripts answer MWUNMARKED; the slot must not be taken for "never used" (marked,
and the beneficiary declined RELATIONSHIP_NOT_FOUND on nothing): its witness (keys.witness) went
with it, so the call answers UNAVAILABLE, the hot state is rebuilt from SQL, and the payment is
approved. Here on the one node of the test server: the slot's keys are deleted, witness and
generation marker included, keys.GENERATION not."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.storage.redis import keys
from authz_server.storage.redis.generation import HotStateGeneration
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.rebuild_writer import witness_commands
from tests.harness import Harness
from tests.test_authorization_rules import (
    HOSPITAL,
    MEDICAL,
    authorize,
    family,
    register_merchants,
)


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


def lose_slot(harness: Harness, hash_slot: int) -> list[str]:
    """Deletes every key of one Redis hash slot, as a node that lost it would have none; the
    names deleted."""
    redis = harness.client

    async def in_slot() -> list[str]:  # SCAN: on a cluster, every primary's keys
        return [
            _text(name)
            async for name in redis.scan_iter(match="mw:*")
            if keys.slot(_text(name)) == hash_slot
        ]

    names = harness.run(in_slot())
    assert names
    harness.run(redis.delete(*names))
    return names


def test_a_slot_that_lost_its_data_is_refused_until_rebuilt_never_declined(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    fam = family(registry, relationships, 30_000)
    first = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 1_000)
    assert first.decision == pb.DECISION_APPROVED, first
    app = harness.app
    before = app.guardian.last_rebuild
    prefix = keys.prefix(fam.beneficiary_id)
    hash_slot = keys.slot(prefix)
    lost = lose_slot(harness, hash_slot)
    assert keys.generation_marker(prefix) in lost and keys.witness(hash_slot) in lost
    assert harness.run(harness.client.exists(keys.GENERATION)) == 1  # still looks complete

    answers: list[str] = []
    deadline = time.monotonic() + 30
    while True:
        try:
            answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 1_000)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            answers.append("UNAVAILABLE")
        else:
            assert answer.decision == pb.DECISION_APPROVED, answer  # never DECLINED
            break
        assert time.monotonic() < deadline, "not rebuilt in time"
        time.sleep(0.05)
    assert answers and answers[0] == "UNAVAILABLE"
    # The guardian rebuilt the hot state from SQL: both holds are there, on the whole quota.
    assert app.guardian.last_rebuild is not before
    assert [(f.relationship_id, f.amount_fen) for f in answer.funding] == [
        (fam.relationship_ids[0], 1_000)
    ]


def test_resolve_marks_an_unused_slot_only_while_its_witness_names_the_generation(
    tmp_path: Any,
) -> None:
    """generation.resolve on its own: an unmarked slot whose witness names the generation is
    marked (never used); one whose witness is missing or another generation's is not, and
    keys.GENERATION is deleted while it names ours, never another's."""
    import asyncio

    from redis.exceptions import ResponseError

    server = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = server.start()
    marker = keys.generation_marker(keys.prefix("beneficiary-w"))
    witness = keys.witness(keys.slot(marker))

    async def resolve(witness_value: str | None, published: str) -> tuple[bool, bool, Any, Any]:
        commands = PipelinedRedis.from_url(url, timeout_seconds=2.0)
        try:
            await commands.execute("FLUSHALL")
            await commands.execute("SET", keys.GENERATION, published)
            if witness_value is not None:
                await commands.execute("SET", witness, witness_value)
            generation = HotStateGeneration()
            generation.value = "g1"
            again = await generation.resolve(commands, [ResponseError(f"MWUNMARKED {marker}")])
            (mark, global_marker) = await commands.execute_many(
                [("GET", marker), ("GET", keys.GENERATION)]
            )
            return again, generation.lost.is_set(), mark, global_marker
        finally:
            await commands.aclose()

    try:
        assert asyncio.run(resolve("g1", "g1|run")) == (True, False, b"g1", b"g1|run")
        assert asyncio.run(resolve(None, "g1|run")) == (False, True, None, None)
        assert asyncio.run(resolve("g0", "g1|run")) == (False, True, None, None)
        assert asyncio.run(resolve("REBUILDING|g1", "g1|run")) == (False, True, None, None)
        # keys.GENERATION names another generation now: adopted, nothing deleted.
        assert asyncio.run(resolve(None, "g2|run")) == (True, False, None, b"g2|run")
    finally:
        server.stop()


def test_witness_tags_cover_every_slot_with_short_keys() -> None:
    started = time.perf_counter()
    tags = keys._witness_tags()
    assert time.perf_counter() - started < 1.0
    assert len(set(tags)) == keys.HASH_SLOTS
    assert all(keys.slot(keys.witness(slot)) == slot for slot in range(keys.HASH_SLOTS))
    assert not any(keys.witness(slot).startswith(keys.GENERATION) for slot in range(16384))
    commands = witness_commands("g", only_existing=True)
    assert len(commands) == keys.HASH_SLOTS and commands[0][-1] == "XX"
