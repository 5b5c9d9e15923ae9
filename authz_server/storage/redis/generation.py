"""The hot state's generation: which rebuild of Redis from SQL the data in Redis belongs to.

Redis is a cache that can vanish (a restart without persistence, FLUSHALL, a replica promoted
with an older copy). Nothing may be decided on what it lost, so:
- a rebuild from SQL (runtime/rebuild.py) writes the whole hot state under a new random
  generation, marks every slot it writes with it (keys.generation_marker), and only then
  publishes it in keys.GENERATION together with the runs of the Redis primaries it was built
  in (each one's run id and replication id: storage/redis/runs.py);
- every script call carries the generation its process decides in (PipelinedRedis appends it)
  and every script first checks its slot's marker (lua/_generation.lua): a lost slot is refused
  before anything is read or written;
- a refused call comes here (`resolve`): a newer complete generation is adopted and the call
  sent again; a slot never used in the current generation is marked (nothing can be in it:
  every write to a slot goes through a script that checks the marker) once its Redis hash
  slot's witness (keys.witness) shows that its node has not lost its data since the rebuild;
  otherwise the hot state is lost, the guardian (runtime/hot_state.py) is told, and the call
  answers UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import RedisError, ResponseError

from authz_server.storage.redis import keys
from authz_server.storage.redis.runs import RUN_SEPARATOR

if TYPE_CHECKING:
    from authz_server.storage.redis.pipelined import PipelinedRedis, Reply

log = logging.getLogger(__name__)
# The error replies of lua/_generation.lua.
SLOT_UNMARKED = "MWUNMARKED"
SLOT_STALE = "MWSTALE"
REBUILDING = "REBUILDING"
# Deletes keys.GENERATION (KEYS[1]) if it names the generation ARGV[1] as complete: 1 if it did.
_FORGET = (
    "local marker = redis.call('GET', KEYS[1]) "
    "if marker and string.sub(marker, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then "
    "return redis.call('DEL', KEYS[1]) end return 0"
)

# Deletes a slot's mark (KEYS[1]) if it is still ARGV[1]: 1 if it did.
_UNMARK = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


def new_generation() -> str:
    """A random token, never one Redis had before (a counter would start again with a Redis
    that lost it)."""
    return os.urandom(8).hex()


@dataclass(frozen=True)
class GlobalMarker:
    """What keys.GENERATION says: a complete generation and the Redis runs it was built in
    (runs.redis_run_ids, as `<generation>|<runs>`), or a rebuild under way."""

    generation: str
    run_ids: str
    rebuilding: bool

    @classmethod
    def parse(cls, raw: Reply | str) -> GlobalMarker | None:
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        first, _, second = text.partition("|")
        if first == REBUILDING:
            return cls(generation=second, run_ids="", rebuilding=True)
        return cls(generation=first, run_ids=second, rebuilding=False)

    def text(self) -> str:
        return (
            f"{REBUILDING}|{self.generation}"
            if self.rebuilding
            else (f"{self.generation}|{self.run_ids}")
        )


def refused_slot(reply: Reply) -> bool:
    """Whether a script's reply is lua/_generation.lua's refusal."""
    return isinstance(reply, ResponseError) and str(reply).startswith((SLOT_UNMARKED, SLOT_STALE))


class HotStateGeneration:
    """This process's generation: appended to every script call by PipelinedRedis. Empty until
    one is adopted, so every script refuses until Redis holds a complete hot state."""

    def __init__(self) -> None:
        self.value = ""
        # Set when a call found the hot state lost or being rebuilt; the guardian waits on it.
        self.lost = asyncio.Event()
        # The Redis runs (runs.redis_run_ids) the adopted generation was built on; None until one
        # is adopted. A script is only sent to one of them (PipelinedRedis.run_gate): a replica
        # promoted in a primary's place, a Redis restarted with its file, or a primary promoted
        # back after it resynced from a replica may miss the last writes, and it is refused at
        # once rather than trusted until the guardian's next look.
        self.trusted_run_ids: frozenset[str] | None = None

    def adopt(self, generation: str, run_ids: str) -> None:
        """Decides in `generation` from now on, on the Redis runs `run_ids` (comma-joined, as
        keys.GENERATION holds them)."""
        if generation != self.value:
            log.info("hot state generation %s adopted", generation)
        self.value = generation
        self.trusted_run_ids = frozenset(run_id for run_id in run_ids.split(",") if run_id)

    def distrust(self) -> None:
        """No script goes to Redis until a generation is adopted again: the guardian found the
        runs changed (a failback keeps the connections open, so the run gate, which reads a
        connection's run when it opens, would not see it by itself)."""
        self.trusted_run_ids = frozenset()

    def trusts(self, run: str) -> bool:
        """Whether a script may go to the Redis run `run` (any, before a generation is adopted:
        every script refuses then anyway). A generation published by a release that knew run
        ids only names bare run ids: trusted on the run id alone, until the next rebuild."""
        trusted = self.trusted_run_ids
        return trusted is None or run in trusted or run.partition(RUN_SEPARATOR)[0] in trusted

    async def resolve(self, redis: PipelinedRedis, refusals: list[Reply]) -> bool:
        """Scripts refused their slots. True when they should be sent again (a newer complete
        generation adopted, or unused slots marked); False when the hot state is lost or being
        rebuilt (the guardian is told; the calls answer UNAVAILABLE)."""
        marker = GlobalMarker.parse(await redis.execute("GET", keys.GENERATION))
        if marker is None or marker.rebuilding:
            self.lost.set()
            return False
        if marker.generation != self.value:
            self.adopt(marker.generation, marker.run_ids)
            return True
        refused = [str(refusal).split() for refusal in refusals]
        stale = [words for words in refused if words[0] == SLOT_STALE]
        if stale:
            # Marked by another generation although ours is complete: an earlier rebuild's page
            # reached Redis after this generation's sweep (its write timed out, the rebuild was
            # given up or taken over, but the commands were only late). Its figures were read
            # from SQL before this rebuild's, and money may have moved since (a capture counted
            # back): taken over, they would be decided on. The hot state is rebuilt instead.
            log.error(
                "slot %s marked by generation %s under generation %s: an earlier rebuild's "
                "write arrived late; rebuilding",
                stale[0][1], stale[0][2], self.value,
            )  # fmt: skip
            await self._forget(redis)
            return False
        unmarked = [words[1] for words in refused if words[0] == SLOT_UNMARKED]
        if unmarked and not await self._witnessed(redis, unmarked):
            return False
        # Never used in this generation: nothing can be in them. NX: a rebuild's mark wins.
        commands: list[tuple[str | bytes | int, ...]] = [
            ("SET", marker, self.value, "NX") for marker in unmarked
        ]
        # Read again once the marks are answered: a rebuild that began between the read above
        # and the marks may have swept the slots already, leaving them marked with this
        # generation in an emptied Redis. Only while it is still the published one are the
        # marks its (a rebuild that begins later sweeps them). A round trip of its own, not
        # the marks' batch: on a Redis Cluster the router follows a redirected mark (ASK,
        # MOVED) after the rest of its run, so a GET in the same batch could run before it.
        for reply in await redis.execute_many(commands):
            if isinstance(reply, ResponseError):
                raise reply
        after = GlobalMarker.parse(await redis.execute("GET", keys.GENERATION))
        if after is None or after.rebuilding or after.generation != self.value:
            # Taken back where still ours: left, a rebuild whose sweep they followed would find
            # them as another generation's (a late page: it fails and starts again) and, in a
            # slot it does not write, MWSTALE would forget the rebuilt generation.
            # At best: one that fails (its slot being moved: ASK) costs a rebuild at most.
            self.lost.set()
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await redis.execute_many(
                    [("EVAL", _UNMARK, 1, slot_mark, self.value) for slot_mark in unmarked]
                )
            return False
        return True

    async def _witnessed(self, redis: PipelinedRedis, markers: list[str]) -> bool:
        """Whether the nodes serving these unmarked slots still hold what the rebuild of our
        generation wrote there: each slot's witness (keys.witness, on the same node as the slot,
        one round trip before the marks) names our generation. keys.GENERATION alone cannot
        say so on a Redis Cluster: it lives on one node, and another node that lost its data
        (FLUSHALL, restarted empty, a replica promoted without the marks) answers MWUNMARKED
        for beneficiaries whose quotas are in SQL; marked "never used", they would be declined
        RELATIONSHIP_NOT_FOUND on nothing. When a witness is missing or names another
        generation, keys.GENERATION is deleted (if it still names ours) so every server's
        guardian finds the hot state lost and one rebuilds it; False (UNAVAILABLE). A hot state
        rebuilt by a version without witnesses has none: it is rebuilt once more, at the first
        unmarked slot (during a rolling upgrade, until no server of that version rebuilds)."""
        witnesses = sorted({keys.witness(keys.slot(marker)) for marker in markers})
        replies = await redis.execute_many([("GET", witness) for witness in witnesses])
        lost: list[str] = []
        for witness, reply in zip(witnesses, replies, strict=True):
            if isinstance(reply, ResponseError):
                raise reply
            if (reply.decode() if isinstance(reply, bytes) else reply) != self.value:
                lost.append(witness)
        if not lost:
            return True
        log.error("hot state generation %s lost on the node(s) of %s: rebuilding", self.value, lost)
        await self._forget(redis)
        return False

    async def _forget(self, redis: PipelinedRedis) -> None:
        """Deletes keys.GENERATION while it names our generation, and tells the guardian.
        Safe: it holds no data, only the claim that Redis holds the whole hot state, which is
        false now. Missing, it reads as a Redis that lost everything (as when its own node
        loses its data): every guardian stops trusting the hot state, one rebuilds it from SQL
        and publishes it again. A newer generation, or a rebuild under way, is left alone."""
        await redis.execute("EVAL", _FORGET, 1, keys.GENERATION, self.value)
        self.lost.set()

    async def wait_lost(self) -> None:
        await self.lost.wait()
        self.lost.clear()


async def published_generation(redis: PipelinedRedis) -> str | None:
    """The complete generation keys.GENERATION names now; None while it is missing or being
    rebuilt."""
    marker = GlobalMarker.parse(await redis.execute("GET", keys.GENERATION))
    return None if marker is None or marker.rebuilding else marker.generation
