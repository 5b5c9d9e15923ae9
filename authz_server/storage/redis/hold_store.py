"""Authorizations and holds in Redis: thin wrappers over the Lua scripts, one call each, through
the pipelined connection; and the sweeper's side (expired holds, stalled captures).

Each script's inputs and reply are one type in script_io.py. The sweeper finds its work through
two indexes Python keeps beside the scripts (keys.DUE_HOLDS, keys.CAPTURES_BEGUN), written in
the same pipelined write as the script call that creates the work, so a sweep costs what is
due, not a SCAN of every key. An index entry is a slot prefix scored with a time by which the
sweeper must look at that slot; it may be early (a visit finds nothing due and moves the entry
on), never late, except after a crash between a script and its index write, or a Redis restart
that kept one and not the other: the safety net (index_step, a SCAN spread over time) puts such
entries back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from authz_server.domain.hot_state import OpenHold
from authz_server.service.ports import (
    NOT_WRITTEN,
    AuthorizeCall,
    CaptureClaim,
    Finish,
    HoldDecision,
    HoldRecord,
    VoidOutcome,
)
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import (
    Command,
    PipelinedRedis,
    Reply,
    as_integer,
    as_list,
    as_text,
)
from authz_server.storage.redis.quota_cache import guarded
from authz_server.storage.redis.script_io import (
    STALE_CAPTURE_SECONDS,
    Authorize,
    AuthorizeForget,
    AuthorizeKind,
    AuthorizeUndo,
    CaptureBegin,
    CaptureFinish,
    Expire,
    HoldRestore,
    ScriptCall,
    Void,
    hold_record,
    run,
)

__all__ = ["NOT_WRITTEN", "STALE_CAPTURE_SECONDS", "AuthorizeCall", "HoldStore", "IndexStep"]

T = TypeVar("T")

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


class HoldStore:
    """`client` (redis-py) stays for the rare commands (reconcile); everything else goes through
    the pipelined connection `commands`."""

    def __init__(self, client: Redis, commands: PipelinedRedis) -> None:
        self.client = client
        self.commands = commands

    def new_authorization_id(self, beneficiary_id: str) -> str:
        """An id for a new authorization of this beneficiary (it names the beneficiary's slot)."""
        return keys.new_authorization_id(beneficiary_id)

    async def authorize(self, call: AuthorizeCall, now_ms: int) -> HoldDecision | None:
        """None when the idempotency key was used before with another request."""
        script_call = Authorize(call, now_ms)
        claim_key = keys.idempotency_claim(call.merchant_id, call.idempotency_key)
        raw, claimed_by = await guarded(
            lambda: self._decide_and_claim(
                script_call,
                claim_key,
                f"{call.request_digest}|{now_ms}",
                now_ms if call.capture_at_once else None,
            ),
            "authorize",
        )
        reply = script_call.unpack(raw)
        if reply.decision is None:
            return None
        if as_text(claimed_by).split("|")[0] != call.request_digest:
            # The merchant used this key first for another request (another beneficiary):
            # forget the decision just made and refuse, as the same beneficiary's slot would.
            if reply.kind is AuthorizeKind.NEW:
                await self.undo(call, call.authorization_id)
            return None
        generation = self.commands.generation
        return replace(reply.decision, generation=generation.value if generation else "")

    async def undo(self, call: AuthorizeCall, authorization_id: str) -> None:
        """Forgets a decision made for `call`'s key (authorize_undo.lua): its hold goes back to
        the quotas; the key's record is dropped if it names this decision."""
        await self._run(AuthorizeUndo(call, authorization_id), "undo")

    async def restore_hold(self, hold: OpenHold, now_ms: int) -> bool:
        """Places an approved hold SQL has and Redis lost (hold_restore.lua). True when placed;
        False when Redis knows the authorization already, or it is expired or void."""
        script_call = HoldRestore(hold, now_ms)
        raw = await guarded(
            lambda: self._script_and_index(
                script_call, keys.DUE_HOLDS, script_call.prefix, script_call.expires_ms
            ),
            "hold_restore",
        )
        return script_call.unpack(raw)

    async def forget_unwritten(self, call: AuthorizeCall, authorization_id: str) -> bool:
        """Forgets this key's decision when it is a one-step payment voided because SQL never
        had it (authorize_forget.lua). True when the key no longer names that decision
        (forgotten here, or by a retry racing this one): the call must ask again."""
        return await self._run(AuthorizeForget(call, authorization_id))

    async def _run(self, call: ScriptCall[T], label: str = "") -> T:
        return await guarded(lambda: run(self.commands, call), label or call.SCRIPT.name)

    async def _decide_and_claim(
        self, call: Authorize, claim_key: str, claim: str, capture_begun_ms: int | None
    ) -> tuple[Reply, Reply]:
        """authorize.lua, the merchant-wide key claim and the due index, pipelined: one round
        trip. The index entry is written whatever the script decides (a call that opened no
        hold costs the sweeper one empty visit; deciding it here would repeat authorize.lua's
        rules); after the script, so a sweeper that read the slot before it will look again.
        A one-step payment (`capture_begun_ms`) is a capture from its start: its slot goes into
        the capture index as well, so a payment its process never finished is settled."""
        commands: list[Command] = [
            call.command(),
            ("SET", claim_key, claim, "NX"),
            ("GET", claim_key),
            ("ZADD", keys.DUE_HOLDS, "LT", call.call.expires_at_ms, call.prefix),
        ]
        if capture_begun_ms is not None:
            commands.append(("ZADD", keys.CAPTURES_BEGUN, "LT", capture_begun_ms, call.prefix))
        for attempt in (1, 2):
            raw, _, claimed_by, *_ = await self.commands.execute_many(commands)
            # The index write's own error is left alone: the safety net repairs the index.
            if isinstance(raw, NoScriptError) and attempt == 1:
                await self.commands.load_script(call.SCRIPT)  # Redis was restarted
                continue
            if isinstance(raw, ResponseError):
                raise raw
            if isinstance(claimed_by, ResponseError):
                raise claimed_by
            return raw, claimed_by
        raise NoScriptError("authorize.lua could not be loaded")

    async def capture_begin(
        self, authorization_id: str, merchant_id: str, key: str, amount_fen: int, now_ms: int
    ) -> CaptureClaim:
        script_call = CaptureBegin(authorization_id, merchant_id, key, amount_fen, now_ms)
        # The capture index entry goes with every claim, whatever its outcome: only an OK claim
        # leaves a capture to finish, but one empty visit of the sweeper costs less than waiting
        # for the answer before writing it.
        raw = await guarded(
            lambda: self._script_and_index(
                script_call, keys.CAPTURES_BEGUN, script_call.prefix, now_ms
            ),
            "capture_begin",
        )
        return script_call.unpack(raw)

    async def capture_finish(
        self, authorization_id: str, claim_token: str, outcome: Finish, parts: str, why: str = ""
    ) -> bool:
        """Finishes the claim `claim_token` names (its cs: when it began, in ms as sent to
        capture_begin or authorize; '' for whichever claim there is): nothing when the hold is
        in another claim by then, or gone (Redis lost it). `why` (with VOIDED): what a later
        capture is told instead of ALREADY_VOIDED. True when it finished the claim."""
        script_call = CaptureFinish(authorization_id, claim_token, Finish(outcome), parts, why)
        if script_call.outcome is Finish.PENDING:
            # The hold is open again (with its own expiry, which may have passed meanwhile):
            # the sweeper looks at the slot at its next round (score 0) and takes it from there.
            raw = await guarded(
                lambda: self._script_and_index(script_call, keys.DUE_HOLDS, script_call.prefix, 0),
                "capture_finish",
            )
            return script_call.unpack(raw)
        return await self._run(script_call)

    async def _script_and_index(
        self, call: ScriptCall[Any], index: str, prefix: str, visit_by_ms: int
    ) -> Reply:
        """A script and, in the same write, after it, the sweeper index entry of its slot (only
        ever moved earlier: LT). The index write's own error is left to the safety net."""
        commands: list[Command] = [call.command(), ("ZADD", index, "LT", visit_by_ms, prefix)]
        raw, _ = await self.commands.execute_many(commands)
        if isinstance(raw, NoScriptError):
            await self.commands.load_script(call.SCRIPT)  # Redis was restarted
            raw, _ = await self.commands.execute_many(commands)
        if isinstance(raw, ResponseError):
            raise raw
        return raw

    async def void(self, authorization_id: str, merchant_id: str, now_ms: int) -> VoidOutcome:
        return await self._run(Void(authorization_id, merchant_id, now_ms))

    async def get(self, authorization_id: str) -> HoldRecord | None:
        """The authorization as Redis has it; None when Redis does not know it."""
        key = keys.authorization(authorization_id)
        return hold_record(await guarded(lambda: self.commands.execute("HGETALL", key)))

    # --- the sweeper's work, found through the indexes (O(what is due)) ----------------------

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
            _raise_error(replies[0])
            back: list[Command] = []
            failure: ResponseError | None = None
            for number, prefix in enumerate(due):
                result, earliest = replies[1 + 2 * number], replies[2 + 2 * number]
                if isinstance(result, ResponseError) or isinstance(earliest, ResponseError):
                    failure = failure or _error(result) or _error(earliest)
                    back.append(("ZADD", keys.DUE_HOLDS, "LT", now_ms, prefix))  # again
                    continue
                expired += Expire(prefix, now_ms, SWEEP_LIMIT).unpack(result)
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
        """Authorizations CAPTURING since before now - older_than_ms, in the slots the capture
        index says may have them. An entry stays while its slot has captures not finished (a
        stalled one is back at once, until it is settled)."""
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
        _raise_error(replies[0])
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
        """The safety net, one SCAN call (`count` keys) at a time: every slot with open holds or
        captures gets its index entries back (lowered to its earliest time when they are
        later), whatever happened to them. The sweeper runs it continuously, spread over time."""
        reply = as_list(
            await guarded(
                lambda: self.commands.execute(
                    "SCAN", cursor, "MATCH", keys.SLOT_ZSETS, "COUNT", count, "TYPE", "zset"
                )
            )
        )
        found = [keys.SLOT_ZSET.fullmatch(as_text(key)) for key in as_list(reply[1])]
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
            _raise_error(earliest)
            _raise_error(size)
            first = as_list(earliest)
            if not first:
                continue  # emptied (and so deleted) meanwhile
            index = keys.DUE_HOLDS if kind == "expiry" else keys.CAPTURES_BEGUN
            back.append(("ZADD", index, "LT", _score(first[1]), prefix))
            if kind == "expiry":
                open_holds += as_integer(size)
        await self._write_all(back)
        return IndexStep(cursor=as_integer(reply[0]), open_holds=open_holds)

    async def keys_in_database(self) -> int:
        return as_integer(await guarded(lambda: self.commands.execute("DBSIZE")))

    async def _due_slots(self, index: str, before_ms: int) -> list[str]:
        due = await guarded(
            lambda: self.commands.execute(
                "ZRANGEBYSCORE", index, "-inf", before_ms, "LIMIT", 0, SLOTS_PER_BATCH
            )
        )
        return [as_text(prefix) for prefix in as_list(due)]

    async def _write_all(self, commands: list[Command]) -> None:
        for reply in await self._execute_in_batches(commands):
            _raise_error(reply)

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
                    still_open += as_integer(_raise_error(replies[2 * number]))
                    first = as_list(_raise_error(replies[2 * number + 1]))
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
            counts = [
                call.unpack(_raise_error(reply)) for call, reply in zip(calls, replies, strict=True)
            ]
            expired += sum(counts)
            prefixes = [
                prefix
                for prefix, count in zip(prefixes, counts, strict=True)
                if count == SWEEP_LIMIT
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
        """The slot prefixes that have a `kind` zset (expiry, capturing), a SCAN page at a time."""
        cursor = 0
        while True:
            reply = as_list(
                await guarded(
                    partial(
                        self.commands.execute,
                        *("SCAN", cursor, "MATCH", keys.slot_zsets_of_kind(kind)),
                        *("COUNT", SCAN_COUNT),
                    )
                )
            )
            found = [keys.SLOT_ZSET.fullmatch(as_text(key)) for key in as_list(reply[1])]
            prefixes = [match.group(1) for match in found if match and match.group(2) == kind]
            if prefixes:
                yield prefixes
            cursor = as_integer(reply[0])
            if cursor == 0:
                return


def _slot_zset(prefix: str, kind: str) -> str:
    return keys.expiry(prefix) if kind == "expiry" else keys.capturing(prefix)


def _error(reply: Reply) -> ResponseError | None:
    return reply if isinstance(reply, ResponseError) else None


def _raise_error(reply: Reply) -> Reply:
    if isinstance(reply, ResponseError):
        raise reply
    return reply


def _score(reply: Reply) -> bytes:
    """A score as Redis printed it, to be written back as it is."""
    if isinstance(reply, bytes):
        return reply
    raise ResponseError(f"expected a score from Redis, got {reply!r}")
