"""The sweeper's side of the hot state (storage/redis/sweeper.py runs it): expired holds and
captures stalled between their phases (and holds a rebuild put back, whose capture may have
committed while Redis was lost), found through the indexes (O(what is due)), and the full SCAN
passes (the safety net that repairs the indexes, tests, reconcile).

The sweeper finds its work through two indexes Python keeps beside the scripts (keys.DUE_HOLDS,
keys.CAPTURES_BEGUN), written by hold_store.py in the same pipelined write as the script call
that creates the work, so a sweep costs what is due, not a SCAN of every key. An index entry is
a slot prefix scored with a time by which the sweeper must look at that slot; it may be early (a
visit finds nothing due and moves the entry on), never late, except after a crash between a
script and its index write, or a Redis restart that kept one and not the other: the safety net
(index_step, a SCAN spread over time) puts such entries back. A rebuild writes the capture
index itself, with the page that lists its put-back holds (storage/redis/rebuild_writer.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from redis.exceptions import NoScriptError, ResponseError

from authz_server.service.ports import STALE_CAPTURE_SECONDS
from authz_server.storage.redis import keys, scans
from authz_server.storage.redis.pipelined import (
    Command,
    PipelinedRedis,
    Reply,
    answered,
    as_integer,
    as_list,
    as_text,
)
from authz_server.storage.redis.quota_cache import guarded
from authz_server.storage.redis.script_io import Expire

__all__ = ["STALE_CAPTURE_SECONDS", "IndexStep", "SweepStore"]

# Holds one expire.lua call expires in one slot (a slot with more is visited again), and slots
# one batch of the sweeper visits: at most 5,000 holds a batch, some 50 ms of Redis time when
# everything falls due at once (after an outage), so the calls queued behind a batch on the
# shared connection stay well within their timeout.
SWEEP_LIMIT = 50
SLOTS_PER_BATCH = 100
# Batches per sweep of due holds (up to 2,000 slots, 100,000 holds a second); the rest waits
# for the next round rather than keeping the connection busy.
DUE_BATCHES_PER_SWEEP = 20
# Keys per SCAN call of the full scans; Redis is busy for about a millisecond per call.
SCAN_COUNT = 1000
# Commands per write of the full scans and the safety net, far below the connection's bound.
COMMANDS_PER_BATCH = 1000


@dataclass(frozen=True)
class IndexStep:
    """One step of the safety net: where SCAN stopped (0: the pass is complete) and how many
    open holds the slots it passed hold."""

    cursor: int
    open_holds: int


class SweepStore:
    """The sweeper's reads and writes, through the pipelined connection `commands`."""

    def __init__(self, commands: PipelinedRedis) -> None:
        self.commands = commands

    # --- found through the indexes (O(what is due)) -----------------------------------------

    async def sweep_due(self, now_ms: int) -> int:
        """Expires the due holds of the slots the due index says are due. Returns how many."""
        expired = 0
        for _ in range(DUE_BATCHES_PER_SWEEP):
            due = await self._due_slots(keys.DUE_HOLDS, now_ms)
            if not due:
                break
            commands: list[Command] = [("ZREM", keys.DUE_HOLDS, *due)]
            for prefix in due:
                commands.append(Expire(prefix, now_ms, SWEEP_LIMIT).command())
                commands.append(("ZRANGE", keys.expiry(prefix), 0, 0, "WITHSCORES"))
            # The entries leave the index before the slots are read (same connection: Redis runs
            # them in this order), and go back with the slot's earliest expiry after. An
            # Authorize in between either ran before the read (and the read sees its hold) or
            # writes its own entry after the removal. Only lowered (LT): never later than
            # what an Authorize wrote meanwhile.
            replies = await guarded(partial(self.commands.execute_many, commands), "expire")
            answered(replies[0])
            back: list[Command] = []
            failure: ResponseError | None = None
            for number, prefix in enumerate(due):
                result, earliest = replies[1 + 2 * number], replies[2 + 2 * number]
                if isinstance(result, ResponseError) or isinstance(earliest, ResponseError):
                    failure = failure or _error(result) or _error(earliest)
                    back.append(("ZADD", keys.DUE_HOLDS, "LT", now_ms, prefix))  # again
                    continue
                expired += Expire(prefix, now_ms, SWEEP_LIMIT).unpack(result).expired
                first = as_list(earliest)
                if first:  # [member, score]: the slot's next expiry (still due if over limit)
                    back.append(("ZADD", keys.DUE_HOLDS, "LT", _score(first[1]), prefix))
            await self._write_all(back)
            if isinstance(failure, NoScriptError):
                await guarded(lambda: self.commands.load_script(Expire.SCRIPT), "expire")
            elif failure is not None:
                raise failure
            # Read the index again: a slot over SWEEP_LIMIT is back in it, still due.
        return expired

    async def stalled_captures_due(self, now_ms: int, older_than_ms: int) -> list[str]:
        """Authorizations CAPTURING since before now - older_than_ms, or put back by a rebuild
        that long ago and not settled yet, in the slots the capture index says may have them.
        An entry stays while its slot has captures not finished (a stalled one is back at
        once, until it is settled)."""
        before_ms = now_ms - older_than_ms
        due = await self._due_slots(keys.CAPTURES_BEGUN, before_ms)
        if not due:
            return []
        commands: list[Command] = [("ZREM", keys.CAPTURES_BEGUN, *due)]
        for prefix in due:
            capturing = keys.capturing(prefix)
            commands.append(("ZRANGEBYSCORE", capturing, "-inf", before_ms))
            commands.append(("ZRANGE", capturing, 0, 0, "WITHSCORES"))
        replies = await guarded(partial(self.commands.execute_many, commands))
        answered(replies[0])
        found: list[str] = []
        back: list[Command] = []
        for number, prefix in enumerate(due):
            stalled, earliest = replies[1 + 2 * number], replies[2 + 2 * number]
            if isinstance(stalled, ResponseError) or isinstance(earliest, ResponseError):
                back.append(("ZADD", keys.CAPTURES_BEGUN, "LT", before_ms, prefix))
                continue
            found.extend(as_text(authorization_id) for authorization_id in as_list(stalled))
            first = as_list(earliest)
            if first:
                back.append(("ZADD", keys.CAPTURES_BEGUN, "LT", _score(first[1]), prefix))
        await self._write_all(back)
        return found

    async def index_step(self, cursor: int, count: int) -> IndexStep:
        """The safety net, one SCAN call (`count` keys) at a time over every primary (`cursor`
        is scans.scan_step's): every slot with open holds or captures gets its index entries
        back (lowered to its earliest time when they are later), whatever happened to them. The
        sweeper runs it continuously, spread over time."""
        next_cursor, names = await guarded(
            lambda: scans.scan_step(self.commands, cursor, keys.SLOT_ZSETS, count, "zset")
        )
        found = [keys.SLOT_ZSET.fullmatch(name) for name in names]
        slots = [(match.group(1), match.group(2)) for match in found if match]
        commands: list[Command] = []
        for prefix, kind in slots:
            commands.append(("ZRANGE", _slot_zset(prefix, kind), 0, 0, "WITHSCORES"))
            commands.append(("ZCARD", _slot_zset(prefix, kind)))
        replies = await self._execute_in_batches(commands)
        back: list[Command] = []
        open_holds = 0
        for number, (prefix, kind) in enumerate(slots):
            earliest, size = replies[2 * number], replies[2 * number + 1]
            answered(earliest)
            answered(size)
            first = as_list(earliest)
            if not first:
                continue  # emptied (and so deleted) meanwhile
            index = keys.DUE_HOLDS if kind == "expiry" else keys.CAPTURES_BEGUN
            back.append(("ZADD", index, "LT", _score(first[1]), prefix))
            if kind == "expiry":
                open_holds += as_integer(size)
        await self._write_all(back)
        return IndexStep(cursor=next_cursor, open_holds=open_holds)

    async def keys_in_database(self) -> int:
        """Keys on every primary."""
        return await guarded(lambda: scans.keys_in_database(self.commands))

    async def _due_slots(self, index: str, before_ms: int) -> list[str]:
        due = await guarded(
            lambda: self.commands.execute(
                "ZRANGEBYSCORE", index, "-inf", before_ms, "LIMIT", 0, SLOTS_PER_BATCH
            )
        )
        return [as_text(prefix) for prefix in as_list(due)]

    async def _write_all(self, commands: list[Command]) -> None:
        for reply in await self._execute_in_batches(commands):
            answered(reply)

    async def _execute_in_batches(self, commands: list[Command]) -> list[Reply]:
        """Many commands, COMMANDS_PER_BATCH at a time (one write each), replies in order."""
        replies: list[Reply] = []
        for start in range(0, len(commands), COMMANDS_PER_BATCH):
            batch = commands[start : start + COMMANDS_PER_BATCH]
            replies.extend(await guarded(partial(self.commands.execute_many, batch)))
        return replies

    # --- everywhere (a SCAN of every key): tests, reconcile ----------------------------------

    async def sweep(self, now_ms: int) -> tuple[int, int]:
        """Expires every due hold in every slot, whatever the index says, and puts the slots'
        due index entries right. Returns (expired now, still open). A full SCAN: for tests and
        tools; the running sweeper uses sweep_due and index_step."""
        expired = still_open = 0
        async for prefixes in self._slots_with("expiry"):
            for start in range(0, len(prefixes), SLOTS_PER_BATCH):
                batch = prefixes[start : start + SLOTS_PER_BATCH]
                expired += await self._expire_all_due(batch, now_ms)
                commands: list[Command] = []
                for prefix in batch:
                    commands.append(("ZCARD", keys.expiry(prefix)))
                    commands.append(("ZRANGE", keys.expiry(prefix), 0, 0, "WITHSCORES"))
                replies = await self._execute_in_batches(commands)
                back: list[Command] = []
                for number, prefix in enumerate(batch):
                    still_open += as_integer(answered(replies[2 * number]))
                    first = as_list(answered(replies[2 * number + 1]))
                    if first:
                        back.append(("ZADD", keys.DUE_HOLDS, "LT", _score(first[1]), prefix))
                await self._write_all(back)
        return expired, still_open

    async def _expire_all_due(self, prefixes: list[str], now_ms: int) -> int:
        """expire.lua on each slot until none has more due holds than it took."""
        expired = 0
        while prefixes:
            calls = [Expire(prefix, now_ms, SWEEP_LIMIT) for prefix in prefixes]
            commands: list[Command] = [call.command() for call in calls]
            replies = await guarded(partial(self.commands.execute_many, commands), "expire")
            if any(isinstance(reply, NoScriptError) for reply in replies):
                await guarded(lambda: self.commands.load_script(Expire.SCRIPT), "expire")
                replies = await guarded(partial(self.commands.execute_many, commands), "expire")
            results = [
                call.unpack(answered(reply)) for call, reply in zip(calls, replies, strict=True)
            ]
            expired += sum(result.expired for result in results)
            # A put-back hold awaiting its settlement is taken but not expired: it moved to its
            # bound, past now, so a slot's due holds run out even when all of them wait.
            prefixes = [
                prefix
                for prefix, result in zip(prefixes, results, strict=True)
                if result.taken == SWEEP_LIMIT
            ]
        return expired

    async def stalled_captures(self, now_ms: int, older_than_ms: int) -> list[str]:
        """Authorizations CAPTURING since before now - older_than_ms, in every slot (a full
        SCAN: reconcile at start-up; the running sweeper uses stalled_captures_due)."""
        found: list[str] = []
        async for prefixes in self._slots_with("capturing"):
            commands: list[Command] = [
                ("ZRANGEBYSCORE", keys.capturing(prefix), "-inf", now_ms - older_than_ms)
                for prefix in prefixes
            ]
            for reply in await self._execute_in_batches(commands):
                found.extend(as_text(authorization_id) for authorization_id in as_list(reply))
        return found

    async def _slots_with(self, kind: str) -> AsyncIterator[list[str]]:
        """The slot prefixes that have a `kind` zset (expiry, capturing), a SCAN page at a time,
        over every primary."""
        pages = scans.scan_pages(self.commands, keys.slot_zsets_of_kind(kind), SCAN_COUNT)
        while True:
            try:
                names = await guarded(partial(anext, pages))
            except StopAsyncIteration:
                return
            found = [keys.SLOT_ZSET.fullmatch(name) for name in names]
            prefixes = [match.group(1) for match in found if match and match.group(2) == kind]
            if prefixes:
                yield prefixes


def _slot_zset(prefix: str, kind: str) -> str:
    return keys.expiry(prefix) if kind == "expiry" else keys.capturing(prefix)


def _error(reply: Reply) -> ResponseError | None:
    return reply if isinstance(reply, ResponseError) else None


def _score(reply: Reply) -> bytes:
    """A score as Redis printed it, to be written back as it is."""
    if isinstance(reply, bytes):
        return reply
    raise ResponseError(f"expected a score from Redis, got {reply!r}")
