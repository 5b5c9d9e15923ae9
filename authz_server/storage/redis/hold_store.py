"""Authorizations and holds in Redis: thin wrappers over the Lua scripts, one call each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from authz_server.storage.redis import keys
from authz_server.storage.redis.quota_cache import guarded
from authz_server.storage.redis.scripts import load

SWEEP_LIMIT = 500
# A capture still CAPTURING this long after it began lost its process (or its Redis reply):
# it is settled as SQL says. Far above a capture's SQL time, so live ones are never touched.
STALE_CAPTURE_SECONDS = 30


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class HoldDecision:
    """What authorize.lua answered (NEW or REPLAY); REUSED raises before this is built."""

    replayed: bool
    authorization_id: str
    decision: str
    decline_reason: str
    approved_fen: int
    funding: str
    remaining_fen: int
    status: str
    expires_at_ms: int
    template: str


@dataclass(frozen=True)
class CaptureClaim:
    outcome: str
    approved_fen: int
    amount_fen: int
    funding: str
    beneficiary_id: str
    purpose: str
    created_ms: int = 0
    expires_ms: int = 0


@dataclass(frozen=True)
class AuthorizeCall:
    authorization_id: str
    merchant_id: str
    beneficiary_id: str
    idempotency_key: str
    purpose: str
    request_digest: str
    eligible_fen: int
    allow_partial: bool
    relationship_id: str
    expires_at_ms: int
    decided_decline: str
    capture_at_once: bool
    requires_resident: bool
    template: str
    requested_fen: int


class HoldStore:
    def __init__(self, client: Redis) -> None:
        self.client = client
        self._authorize = load(client, "authorize")
        self._undo = load(client, "authorize_undo")
        self._capture_begin = load(client, "capture_begin")
        self._capture_finish = load(client, "capture_finish")
        self._void = load(client, "void")
        self._expire = load(client, "expire")

    async def authorize(self, call: AuthorizeCall, now_ms: int) -> HoldDecision | None:
        """None when the idempotency key was used before with another request."""
        prefix = keys.prefix(call.beneficiary_id)
        script_keys = [
            keys.authorization(call.authorization_id),
            keys.idempotency(call.beneficiary_id, call.merchant_id, call.idempotency_key),
            keys.quota_index(call.beneficiary_id),
            keys.expiry(prefix),
        ]
        arguments: list[str | int] = [
            prefix,
            now_ms,
            call.authorization_id,
            call.merchant_id,
            call.beneficiary_id,
            call.purpose,
            call.request_digest,
            call.eligible_fen,
            int(call.allow_partial),
            call.relationship_id,
            call.expires_at_ms,
            call.decided_decline,
            int(call.capture_at_once),
            int(call.requires_resident),
            call.template,
            call.requested_fen,
        ]
        claim_key = keys.idempotency_claim(call.merchant_id, call.idempotency_key)
        raw, claimed_by = await guarded(
            lambda: self._decide_and_claim(
                script_keys, arguments, claim_key, f"{call.request_digest}|{now_ms}"
            ),
            "authorize",
        )
        reply = [_text(part) for part in raw]
        if reply[0] == "REUSED":
            return None
        if _text(claimed_by).split("|")[0] != call.request_digest:
            # The merchant used this key first for another request (another beneficiary):
            # forget the decision just made and refuse, as the same beneficiary's slot would.
            if reply[0] == "NEW":
                undo_keys = script_keys[:2]
                undo_args = [prefix, call.authorization_id]
                await guarded(lambda: self._undo(keys=undo_keys, args=undo_args), "undo")
            return None
        return HoldDecision(
            replayed=reply[0] == "REPLAY",
            authorization_id=reply[1],
            decision=reply[2],
            decline_reason=reply[3],
            approved_fen=int(reply[4]),
            funding=reply[5],
            remaining_fen=int(reply[6]),
            status=reply[7],
            expires_at_ms=int(reply[8]),
            template=reply[9],
        )

    async def _decide_and_claim(
        self, script_keys: list[str], arguments: list[str | int], claim_key: str, claim: str
    ) -> tuple[Any, Any]:
        """authorize.lua and the merchant-wide key claim, pipelined: one round trip."""
        for attempt in (1, 2):
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.evalsha(self._authorize.sha, len(script_keys), *script_keys, *arguments)
                pipe.set(claim_key, claim, nx=True)
                pipe.get(claim_key)
                raw, _, claimed_by = await pipe.execute(raise_on_error=False)
            if isinstance(raw, NoScriptError) and attempt == 1:
                await self.client.script_load(self._authorize.script)  # Redis was restarted
                continue
            if isinstance(raw, Exception):
                raise raw
            if isinstance(claimed_by, Exception):
                raise claimed_by
            return raw, claimed_by
        raise NoScriptError("authorize.lua could not be loaded")

    async def capture_begin(
        self, authorization_id: str, merchant_id: str, key: str, amount_fen: int, now_ms: int
    ) -> CaptureClaim:
        prefix = keys.prefix_of_authorization(authorization_id)
        script_keys = [keys.authorization(authorization_id)]
        arguments: list[str | int] = [
            prefix, now_ms, merchant_id, key, amount_fen, STALE_CAPTURE_SECONDS * 1000,
        ]  # fmt: skip
        raw: Any = await guarded(
            lambda: self._capture_begin(keys=script_keys, args=arguments), "capture_begin"
        )
        reply = [_text(part) for part in raw]
        if len(reply) == 1:
            return CaptureClaim(reply[0], 0, 0, "", "", "")
        return CaptureClaim(
            reply[0], int(reply[1]), int(reply[2]), reply[3], reply[4], reply[5],
            int(reply[6]), int(reply[7]),
        )  # fmt: skip

    async def capture_finish(
        self, authorization_id: str, outcome: str, parts: str, why: str = ""
    ) -> None:
        """`why` (with VOIDED): what a later capture is told instead of ALREADY_VOIDED."""
        prefix = keys.prefix_of_authorization(authorization_id)
        script_keys = [keys.authorization(authorization_id)]
        await guarded(
            lambda: self._capture_finish(keys=script_keys, args=[prefix, outcome, parts, why]),
            "capture_finish",
        )

    async def void(self, authorization_id: str, merchant_id: str, now_ms: int) -> str:
        prefix = keys.prefix_of_authorization(authorization_id)
        script_keys = [keys.authorization(authorization_id)]
        raw: Any = await guarded(
            lambda: self._void(keys=script_keys, args=[prefix, now_ms, merchant_id]), "void"
        )
        return _text(raw)

    async def get(self, authorization_id: str) -> dict[str, str]:
        raw: Any = await guarded(lambda: self.client.hgetall(keys.authorization(authorization_id)))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def sweep(self, now_ms: int) -> tuple[int, int]:
        """Expires due holds everywhere (the scripts also expire lazily in their own slot).
        Returns (expired now, still open)."""
        expired = still_open = 0
        async for key in self.client.scan_iter(match="mw:{b:*}:expiry", count=1000):
            expired += await self._sweep_slot(_text(key), now_ms)
            still_open += await self._open_in_slot(_text(key))
        return expired, still_open

    async def stalled_captures(self, now_ms: int, older_than_ms: int) -> list[str]:
        """Authorizations CAPTURING since before now - older_than_ms, in every slot."""
        found: list[str] = []
        async for key in self.client.scan_iter(match="mw:{b:*}:capturing", count=1000):
            ids = await self._stalled_in_slot(_text(key), now_ms - older_than_ms)
            found.extend(ids)
        return found

    async def _stalled_in_slot(self, capturing_key: str, before_ms: int) -> list[str]:
        ids: Any = await guarded(
            lambda: self.client.zrangebyscore(capturing_key, "-inf", before_ms)
        )
        return [_text(i) for i in ids]

    async def _open_in_slot(self, expiry_key: str) -> int:
        count: Any = await guarded(lambda: self.client.zcard(expiry_key))
        return int(count)

    async def _sweep_slot(self, expiry_key: str, now_ms: int) -> int:
        prefix = expiry_key.removesuffix(":expiry")
        arguments: list[str | int] = [prefix, now_ms, SWEEP_LIMIT]
        count: Any = await guarded(
            lambda: self._expire(keys=[expiry_key], args=arguments), "expire"
        )
        return int(count)
