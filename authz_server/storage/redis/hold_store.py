"""Authorizations and holds in Redis, one call at a time: thin wrappers over the Lua scripts
(each script's inputs and reply are one type in script_io.py), through the pipelined connection.

A call that creates work for the sweeper (a hold that will expire, a capture that may stall)
writes the sweeper's index entry for its slot in the same pipelined write as its script, after
it (keys.DUE_HOLDS, keys.CAPTURES_BEGUN): sweep_store.py reads those indexes.
"""

from __future__ import annotations

from typing import Any, TypeVar

from redis.exceptions import NoScriptError, ResponseError

from authz_server.domain.hot_state import OpenHold
from authz_server.service.ports import (
    NOT_WRITTEN,
    STALE_CAPTURE_SECONDS,
    AuthorizeCall,
    CaptureClaim,
    CaptureEntries,
    Finish,
    FinishReply,
    HoldDecision,
    HoldRecord,
    VoidOutcome,
)
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import (
    Command,
    PipelinedRedis,
    Reply,
    as_text,
)
from authz_server.storage.redis.quota_cache import guarded
from authz_server.storage.redis.script_io import (
    Authorize,
    AuthorizeForget,
    AuthorizeKind,
    AuthorizeUndo,
    CaptureBegin,
    CaptureClear,
    CaptureFinish,
    HoldRestore,
    ScriptCall,
    Void,
    hold_record,
    run,
)

__all__ = ["NOT_WRITTEN", "STALE_CAPTURE_SECONDS", "AuthorizeCall", "HoldStore"]

T = TypeVar("T")


class HoldStore:
    """Every call through the pipelined connection `commands`."""

    def __init__(self, commands: PipelinedRedis) -> None:
        self.commands = commands

    def new_authorization_id(self, beneficiary_id: str) -> str:
        """An id for a new authorization of this beneficiary (it names the beneficiary's slot)."""
        return keys.new_authorization_id(beneficiary_id)

    async def authorize(self, call: AuthorizeCall, now_ms: int) -> HoldDecision | None:
        """None when the idempotency key was used before with another request."""
        script_call = Authorize(call, now_ms)
        claim_key = keys.idempotency_claim(call.merchant_id, call.idempotency_key)
        raw, claimed_by, generation = await guarded(
            lambda: self._decide_and_claim(
                script_call,
                claim_key,
                f"{call.request_digest}|{now_ms}",
                now_ms if call.capture_at_once else None,
            ),
            "authorize",
        )
        # The generation the script ran under, not the one in use once its reply is read:
        # another call may have adopted a newer one meanwhile (a rebuild that read SQL before
        # this decision's journal row), and the journal must refuse this decision then.
        reply = script_call.unpack(raw, generation)
        if reply.decision is None:
            return None
        if as_text(claimed_by).split("|")[0] != call.request_digest:
            # The merchant used this key first for another request (another beneficiary):
            # forget the decision just made and refuse, as the same beneficiary's slot would.
            if reply.kind is AuthorizeKind.NEW:
                await self.undo(call, call.authorization_id)
            return None
        return reply.decision

    async def undo(self, call: AuthorizeCall, authorization_id: str) -> None:
        """Forgets a decision made for `call`'s key (authorize_undo.lua): its hold goes back to
        the quotas; the key's record is dropped if it names this decision."""
        await self._run(AuthorizeUndo.of(call, authorization_id), "undo")

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
    ) -> tuple[Reply, Reply, str]:
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
            stamps: list[str] = []
            raw, _, claimed_by, *_ = await self.commands.execute_many(commands, stamps)
            # The index write's own error is left alone: the safety net repairs the index.
            if isinstance(raw, NoScriptError) and attempt == 1:
                await self.commands.load_script(call.SCRIPT)  # Redis was restarted
                continue
            if isinstance(raw, ResponseError):
                raise raw
            if isinstance(claimed_by, ResponseError):
                raise claimed_by
            return raw, claimed_by, stamps[0]
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
        self,
        authorization_id: str,
        claim_token: str,
        outcome: Finish,
        parts: str,
        why: str = "",
        capture_entries: CaptureEntries | None = None,
    ) -> FinishReply:
        """Finishes the claim `claim_token` names (its cs: when it began, in ms as sent to
        capture_begin or authorize; '' for whichever claim there is): nothing when the hold is
        in another claim by then, or gone (Redis lost it). `why` (with VOIDED): what a later
        capture is told instead of ALREADY_VOIDED. `capture_entries` (with CAPTURED): the
        capture's ledger entries, which a hold a rebuild put back asks for (ENTRIES_NEEDED)."""
        script_call = CaptureFinish(
            authorization_id, claim_token, Finish(outcome), parts, why, capture_entries
        )
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

    async def clear_capture(self, authorization_id: str, expires_ms: int) -> bool:
        """capture_clear.lua: out of the slot's capturing zset unless CAPTURING. A PENDING hold
        gets its own expiry back (expire_due may have moved it to its bound), so the slot's due
        index entry is lowered to `expires_ms` in the same write (LT: never later)."""
        script_call = CaptureClear(authorization_id)
        raw = await guarded(
            lambda: self._script_and_index(
                script_call, keys.DUE_HOLDS, script_call.prefix, expires_ms
            ),
            "capture_clear",
        )
        return script_call.unpack(raw)

    async def void(self, authorization_id: str, merchant_id: str, now_ms: int) -> VoidOutcome:
        return await self._run(Void(authorization_id, merchant_id, now_ms))

    async def get(self, authorization_id: str) -> HoldRecord | None:
        """The authorization as Redis has it; None when Redis does not know it."""
        key = keys.authorization(authorization_id)
        return hold_record(await guarded(lambda: self.commands.execute("HGETALL", key)))
