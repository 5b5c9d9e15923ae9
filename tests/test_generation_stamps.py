"""A decision is labelled with the generation its script ran under (PipelinedRedis stamps), not
with the one in use when its reply is read: another call may adopt a newer generation while the
reply is on its way (a rebuild that read SQL before this decision's journal row), and then the
journal must refuse the decision (service/journal.py), which it can only do if the label is the
script's own. On a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from importlib import resources

import pytest

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.storage.redis import keys
from authz_server.storage.redis.generation import HotStateGeneration
from authz_server.storage.redis.pipelined import PipelinedRedis, Script

pytestmark = pytest.mark.backend_neutral

PREFIX = keys.prefix("beneficiary-stamped")
# The generation check every script of the service begins with, then a reply.
CHECKED = Script(
    resources.files("authz_server.storage.redis").joinpath("lua/_generation.lua").read_text()
    + "\nreturn 'ran'"
)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("stamps") / "redis", persistent=False)
    yield server.start()
    server.stop()


async def _client(url: str, slot_marked: str, published: str, ours: str) -> PipelinedRedis:
    client = PipelinedRedis.from_url(url, timeout_seconds=2.0)
    await client.execute("FLUSHALL")
    await client.execute("SET", keys.generation_marker(PREFIX), slot_marked)
    await client.execute("SET", keys.GENERATION, published)
    await client.load_script(CHECKED)
    client.generation = HotStateGeneration()
    client.generation.value = ours
    return client


def _command() -> tuple[str | int, ...]:
    return ("EVALSHA", CHECKED.sha, 1, f"{PREFIX}:q:r1")


def test_a_generation_adopted_while_the_reply_is_on_its_way_is_not_the_scripts(
    redis_url: str,
) -> None:
    async def scenario() -> tuple[list[bytes], list[str], str]:
        client = await _client(redis_url, slot_marked="g1", published="g1|", ours="g1")
        try:
            stamps: list[str] = []
            sent = asyncio.get_running_loop().create_task(client.execute_many([_command()], stamps))
            await asyncio.sleep(0)  # queued, with g1 after its arguments
            assert client.generation is not None
            client.generation.adopt("g2", "")  # another call found g2 published meanwhile
            replies = await sent
            return replies, stamps, client.generation.value
        finally:
            await client.aclose()

    replies, stamps, in_use = asyncio.run(scenario())
    assert replies == [b"ran"]  # the slot was g1's: the script ran under g1
    assert stamps == ["g1"] and in_use == "g2"


def test_a_script_refused_and_sent_again_carries_the_generation_it_ran_under(
    redis_url: str,
) -> None:
    async def scenario() -> tuple[list[bytes], list[str]]:
        client = await _client(redis_url, slot_marked="g2", published="g2|", ours="g1")
        try:
            stamps: list[str] = []
            return await client.execute_many([_command(), ("GET", "nothing")], stamps), stamps
        finally:
            await client.aclose()

    replies, stamps = asyncio.run(scenario())
    assert replies == [b"ran", None]  # refused as stale, g2 adopted, sent again
    assert stamps[0] == "g2"


def test_without_a_generation_the_stamps_are_empty(redis_url: str) -> None:
    async def scenario() -> list[str]:
        client = PipelinedRedis.from_url(redis_url, timeout_seconds=2.0)
        try:
            stamps: list[str] = ["left over"]
            await client.execute_many([("PING",)], stamps)
            return stamps
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [""]


def test_an_authorize_decision_carries_its_scripts_generation(redis_url: str) -> None:
    """The same race through HoldStore.authorize and authorize.lua: a beneficiary with no
    quota (declined, but a decision all the same), its slot marked g1; g2 adopted while the
    reply is on its way. The decision says g1, so the journal would refuse it under g2."""
    from authz_server.service.ports import AuthorizeCall
    from authz_server.storage.redis.hold_store import HoldStore
    from authz_server.storage.redis.scripts import preload

    beneficiary = "beneficiary-race"
    call = AuthorizeCall(
        authorization_id=keys.new_authorization_id(beneficiary),
        merchant_id="m-race",
        beneficiary_id=beneficiary,
        idempotency_key="k-race",
        purpose="MEDICINE",
        request_digest="d" * 16,
        eligible_fen=100,
        allow_partial=False,
        relationship_id="",
        expires_at_ms=2**41,
        decided_decline="",
        capture_at_once=False,
        requires_resident=False,
        template="",
        requested_fen=100,
    )

    async def scenario() -> tuple[str, str]:
        client = PipelinedRedis.from_url(redis_url, timeout_seconds=2.0)
        try:
            await client.execute("FLUSHALL")
            await client.execute("SET", keys.generation_marker(keys.prefix(beneficiary)), "g1")
            await preload(client)
            client.generation = HotStateGeneration()
            client.generation.value = "g1"
            deciding = asyncio.get_running_loop().create_task(
                HoldStore(client).authorize(call, 10**12)
            )
            await asyncio.sleep(0)
            client.generation.adopt("g2", "")
            decision = await deciding
            assert decision is not None
            return decision.generation, client.generation.value
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == ("g1", "g2")
