"""The hot state's side of releasing abandoned holds (runtime/release_abandoned_holds.py says
when): the holds on a page of quotas, what their keys' records say of the calls that placed
them, and the release itself (lua/authorize_undo.lua, as a call undoes its own decision).

Plain reads, pipelined: each key is of one beneficiary's slot (a command names one key), so on a
cluster each command goes to its own node. What they read may change right after (a capture, an
expiry, a retry): the release is decided by SQL, and authorize_undo.lua releases only a hold
still PENDING or CAPTURING, so a read that is stale by then changes nothing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from authz_server.domain.abandoned_holds import FirstCall, HoldInRedis
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import (
    Command,
    PipelinedRedis,
    Reply,
    all_answered,
    as_integer,
    as_list,
    as_text,
)
from authz_server.storage.redis.quota_cache import guarded
from authz_server.storage.redis.script_io import AuthorizeUndo, run

# The authorization hash's fields a release looks at, in HoldInRedis's order (lua/_lib.lua
# names them; ik, the idempotency key, is written by lua/authorize.lua).
HOLD_FIELDS = ("m", "b", "p", "s", "ap", "cr", "rt", "ex", "ik", "o", "rs")


class UnconfirmedHolds:
    """Every call through the pipelined connection `commands`."""

    def __init__(self, commands: PipelinedRedis) -> None:
        self.commands = commands

    async def on_quotas(
        self, quotas: Sequence[tuple[str, str]], per_quota: int, in_all: int
    ) -> list[HoldInRedis]:
        """The holds on the quotas ((beneficiary id, relationship id) each), each once though it
        draws on several: at most `per_quota` of each quota's and `in_all` in all, drawn at
        random (SRANDMEMBER, then a sample) when there are more, so a later pass reads others."""
        if not quotas:
            return []
        drawn = await self._answered(
            [("SRANDMEMBER", keys.quota_holds(b, r), per_quota) for b, r in quotas]
        )
        ids = list(dict.fromkeys(as_text(member) for reply in drawn for member in as_list(reply)))
        if len(ids) > in_all:
            ids = random.sample(ids, in_all)
        if not ids:
            return []
        rows = await self._answered(
            [("HMGET", keys.authorization(each), *HOLD_FIELDS) for each in ids]
        )
        holds = (_hold(each, as_list(row)) for each, row in zip(ids, rows, strict=True))
        return [hold for hold in holds if hold is not None]

    async def first_calls(self, holds: Sequence[HoldInRedis]) -> dict[str, FirstCall]:
        """By authorization id: what the record of each hold's key says of the call that placed
        it. A hold whose key's record names another decision, or is gone, is left out."""
        if not holds:
            return {}
        rows = await self._answered(
            [
                ("HMGET", keys.idempotency(h.beneficiary_id, h.merchant_id, h.idempotency_key),
                 "a", "digest", "t")
                for h in holds
            ]
        )  # fmt: skip
        found: dict[str, FirstCall] = {}
        for hold, row in zip(holds, rows, strict=True):
            named, digest, template = as_list(row)
            if named is not None and as_text(named) == hold.authorization_id and digest is not None:
                found[hold.authorization_id] = FirstCall(
                    as_text(digest), "" if template is None else as_text(template)
                )
        return found

    async def release(self, hold: HoldInRedis) -> bool:
        """The hold's money back to its quotas and the hold forgotten, its key's record too if it
        still names it (authorize_undo.lua). False when it gave nothing back: the hold was no
        longer PENDING or CAPTURING (released by another page or server, or undone by the till's
        retry meeting SQL's decline first)."""
        undo = AuthorizeUndo(
            hold.beneficiary_id, hold.merchant_id, hold.idempotency_key, hold.authorization_id
        )
        return await guarded(lambda: run(self.commands, undo), "release_abandoned")

    async def _answered(self, commands: list[Command]) -> list[Reply]:
        """The replies of one pipelined write, or its first error reply raised; a Redis that
        does not answer is Unavailable (guarded)."""

        async def send() -> list[Reply]:
            return all_answered(await self.commands.execute_many(commands))

        return await guarded(send, "abandoned_holds_read")


def _hold(authorization_id: str, row: list[Reply]) -> HoldInRedis | None:
    """A HMGET of HOLD_FIELDS as a HoldInRedis; None when the hash is gone (released, or
    dropped by retention, since the quota's set was read)."""
    (
        merchant, beneficiary, purpose, status, approved, created, asked_again, expires, key,
        one_step, put_back,
    ) = row  # fmt: skip
    if status is None or beneficiary is None:
        return None
    return HoldInRedis(
        authorization_id=authorization_id,
        merchant_id=as_text(merchant or b""),
        beneficiary_id=as_text(beneficiary),
        purpose=as_text(purpose or b""),
        status=as_text(status),
        approved_fen=as_integer(approved or 0),
        created_ms=as_integer(created or 0),
        asked_again_ms=as_integer(asked_again or 0),
        expires_ms=as_integer(expires or 0),
        idempotency_key=as_text(key or b""),
        one_step=one_step == b"1",
        put_back=put_back == b"1",
    )
