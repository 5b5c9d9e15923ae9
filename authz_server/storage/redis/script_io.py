"""Each hold script's inputs and reply as one named type: the one place the order of a script's
KEYS and ARGV is written (each lua/ script's header points here) and its reply is read.

A call is a frozen dataclass: `keys()` and `arguments()` pack it, `unpack(raw)` reads what the
script answered into the service's types (service/ports.py). `command()` is its EVALSHA for a
pipelined write; `run()` sends it alone. The quota scripts' and the rate limit's are in
quota_io.py. The generation every script checks first (lua/_generation.lua) is appended by the
connection (storage/redis/generation.py), after these arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Generic, TypeVar

from authz_server.domain.funding import format_funding, parse_funding
from authz_server.domain.hot_state import OpenHold
from authz_server.domain.types import Decision, DeclineReason
from authz_server.service.ports import (
    STALE_CAPTURE_SECONDS,
    AuthorizeCall,
    CaptureClaim,
    CaptureEntries,
    CaptureOutcome,
    Finish,
    FinishReply,
    HoldDecision,
    HoldRecord,
    HoldStatus,
    VoidOutcome,
)
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import (
    Argument,
    Command,
    PipelinedRedis,
    Reply,
    Script,
    as_integer,
    as_list,
    as_text,
)
from authz_server.storage.redis.scripts import script

R = TypeVar("R")

# How long at most a hold a rebuild put back waits for the sweeper to settle it as SQL says
# before its expiry may release it (its bound sb, from the rebuild's time; lua/_lib.lua
# awaiting_settlement). The sweeper settles such holds from STALE_CAPTURE_SECONDS after the
# rebuild on, the slots of one capture index batch a round (about a second each, ~1 ms of SQL
# a hold): the 20,000 open holds of issue 12's size took 4-8 minutes on 2 shared cores. Past
# the bound only a sweeper that could not settle one (SQL down for hours, or failing on that
# hold) leaves it: it is then released as before, at worst overstating the quota until a
# reconcile, rather than held forever. Hours, so an outage of SQL is outlasted (nothing is
# approved while the journal cannot be written, and the sweeper settles once it is back).
PUT_BACK_SETTLEMENT_BOUND_SECONDS = 6 * 3_600
# The most other holds of one quota lua/capture_finish.lua recounts (a hold a rebuild put back,
# whose capture a quota restore counted already); past it the part is released as taken, the
# quota understated until set from the ledger (FINISHED_UNDERSTATED). A family's open holds on
# one quota are a handful: the bound keeps one script's work bounded, not the common case.
HOLDS_PER_RECOUNT = 1_000


class ScriptCall(Generic[R]):
    """One call of the Lua script `SCRIPT`, answering an R."""

    SCRIPT: ClassVar[Script]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def arguments(self) -> list[Argument]:
        raise NotImplementedError

    def unpack(self, raw: Reply) -> R:
        raise NotImplementedError

    def command(self) -> Command:
        """The EVALSHA of this call, for a pipelined write of several commands."""
        script_keys = self.keys()
        return ("EVALSHA", self.SCRIPT.sha, len(script_keys), *script_keys, *self.arguments())


async def run(redis: PipelinedRedis, call: ScriptCall[R]) -> R:
    """The call alone (loaded again first if Redis lost the script), its reply unpacked."""
    return call.unpack(await redis.evalsha(call.SCRIPT, call.keys(), call.arguments()))


def _texts(raw: Reply) -> list[str]:
    return [as_text(part) for part in as_list(raw)]


class AuthorizeKind(StrEnum):
    NEW = "NEW"  # decided now
    REPLAY = "REPLAY"  # the key's first decision
    REUSED = "REUSED"  # the key was used before with another request: nothing decided


@dataclass(frozen=True)
class AuthorizeReply:
    kind: AuthorizeKind
    decision: HoldDecision | None  # None when REUSED


@dataclass(frozen=True)
class Authorize(ScriptCall[AuthorizeReply]):
    """lua/authorize.lua: expire due holds, check idempotency, choose the funding, place the
    hold, remember the answer."""

    SCRIPT = script("authorize")
    call: AuthorizeCall
    now_ms: int

    @property
    def prefix(self) -> str:
        return keys.prefix(self.call.beneficiary_id)

    def keys(self) -> list[str]:
        call = self.call
        return [
            keys.authorization(call.authorization_id),
            keys.idempotency(call.beneficiary_id, call.merchant_id, call.idempotency_key),
            keys.quota_index(call.beneficiary_id),
            keys.expiry(self.prefix),
        ]

    def arguments(self) -> list[Argument]:
        call = self.call
        return [
            self.prefix,  # 1
            self.now_ms,  # 2
            call.authorization_id,  # 3
            call.merchant_id,  # 4
            call.beneficiary_id,  # 5
            call.purpose,  # 6
            call.request_digest,  # 7
            call.eligible_fen,  # 8
            int(call.allow_partial),  # 9
            call.relationship_id,  # 10
            call.expires_at_ms,  # 11
            call.decided_decline,  # 12
            int(call.capture_at_once),  # 13
            int(call.requires_resident),  # 14
            call.template,  # 15
            call.requested_fen,  # 16
            call.idempotency_key,  # 17: kept in the hold (release_abandoned_holds.py)
        ]

    def unpack(self, raw: Reply, generation: str = "") -> AuthorizeReply:
        """{'REUSED'} | {'REPLAY' or 'NEW', authorization id, decision, decline reason,
        approved fen, funding, remaining fen, status, expires at ms, line template}.
        `generation`: the hot state's generation the decision was made in (HoldDecision)."""
        reply = _texts(raw)
        kind = AuthorizeKind(reply[0])
        if kind is AuthorizeKind.REUSED:
            return AuthorizeReply(kind, None)
        decision = HoldDecision(
            replayed=kind is AuthorizeKind.REPLAY,
            authorization_id=reply[1],
            decision=Decision(reply[2]),
            decline_reason=DeclineReason(reply[3]) if reply[3] else None,
            approved_fen=int(reply[4]),
            funding=parse_funding(reply[5]),
            remaining_fen=int(reply[6]),
            status=HoldStatus(reply[7]),
            expires_at_ms=int(reply[8]),
            template=reply[9],
            generation=generation,
        )
        return AuthorizeReply(kind, decision)


@dataclass(frozen=True)
class AuthorizeUndo(ScriptCall[bool]):
    """lua/authorize_undo.lua: a decision made for a merchant's idempotency key goes (its hold
    back to the quotas; the key's record dropped if it names this decision)."""

    SCRIPT = script("authorize_undo")
    beneficiary_id: str
    merchant_id: str
    idempotency_key: str
    authorization_id: str

    @classmethod
    def of(cls, call: AuthorizeCall, authorization_id: str) -> AuthorizeUndo:
        """The undo of a decision made for `call`'s key."""
        return cls(call.beneficiary_id, call.merchant_id, call.idempotency_key, authorization_id)

    def keys(self) -> list[str]:
        return [
            keys.authorization(self.authorization_id),
            keys.idempotency(self.beneficiary_id, self.merchant_id, self.idempotency_key),
        ]

    def arguments(self) -> list[Argument]:
        return [keys.prefix(self.beneficiary_id), self.authorization_id]

    def unpack(self, raw: Reply) -> bool:
        """True when the undo gave money back (the hold was PENDING or CAPTURING)."""
        return as_integer(raw) == 1


@dataclass(frozen=True)
class AuthorizeForget(ScriptCall[bool]):
    """lua/authorize_forget.lua: the key's decision is forgotten if it is a one-step payment
    voided NOT_WRITTEN. True when the key no longer names that decision (forgotten here, or by
    a retry racing this one)."""

    SCRIPT = script("authorize_forget")
    call: AuthorizeCall
    authorization_id: str

    def keys(self) -> list[str]:
        call = self.call
        return [
            keys.idempotency(call.beneficiary_id, call.merchant_id, call.idempotency_key),
            keys.authorization(self.authorization_id),
        ]

    def arguments(self) -> list[Argument]:
        return [self.authorization_id]

    def unpack(self, raw: Reply) -> bool:
        return as_integer(raw) != 0  # 1 forgotten, -1 gone already, 0 it stands


@dataclass(frozen=True)
class HoldRestore(ScriptCall[bool]):
    """lua/hold_restore.lua: an approved hold SQL has and Redis lost, placed again. True when
    placed; False when Redis knows the authorization, or it is expired or void."""

    SCRIPT = script("hold_restore")
    hold: OpenHold
    now_ms: int

    @property
    def prefix(self) -> str:
        return keys.prefix(self.hold.beneficiary_id)

    @property
    def expires_ms(self) -> int:
        return int(self.hold.expires_at.timestamp() * 1000)

    def keys(self) -> list[str]:
        return [keys.authorization(self.hold.authorization_id)]

    def arguments(self) -> list[Argument]:
        hold = self.hold
        return [
            self.prefix,  # 1
            self.now_ms,  # 2
            hold.merchant_id,  # 3
            hold.beneficiary_id,  # 4
            hold.purpose,  # 5
            hold.approved_fen,  # 6
            format_funding(hold.funding),  # 7
            self.expires_ms,  # 8
            int(hold.created_at.timestamp() * 1000),  # 9
            hold.decision,  # 10
        ]

    def unpack(self, raw: Reply) -> bool:
        return as_integer(raw) == 1


@dataclass(frozen=True)
class CaptureBegin(ScriptCall[CaptureClaim]):
    """lua/capture_begin.lua: claims a pending hold (CAPTURING) so that neither expiry nor a
    void takes it while the capture is written to SQL."""

    SCRIPT = script("capture_begin")
    authorization_id: str
    merchant_id: str
    capture_key: str
    amount_fen: int  # 0: all of it
    now_ms: int

    @property
    def prefix(self) -> str:
        return keys.prefix_of_authorization(self.authorization_id)

    def keys(self) -> list[str]:
        return [keys.authorization(self.authorization_id)]

    def arguments(self) -> list[Argument]:
        return [
            self.prefix,  # 1
            self.now_ms,  # 2
            self.merchant_id,  # 3
            self.capture_key,  # 4
            self.amount_fen,  # 5
            STALE_CAPTURE_SECONDS * 1000,  # 6: after this, a claim still CAPTURING is STALLED
            # 7: how long after a put-back hold was listed a claim lost with Redis may commit,
            # clock skew between servers included (lua/_lib.lua lost_claim_may_commit)
            STALE_CAPTURE_SECONDS * 1000,
        ]

    def unpack(self, raw: Reply) -> CaptureClaim:
        """{outcome} or {outcome, approved fen, amount fen, funding, beneficiary, purpose,
        created ms, expires ms}."""
        reply = _texts(raw)
        outcome = CaptureOutcome(reply[0])
        if len(reply) == 1:
            return CaptureClaim(outcome, 0, 0, (), "", "")
        return CaptureClaim(
            outcome, int(reply[1]), int(reply[2]), parse_funding(reply[3]), reply[4], reply[5],
            int(reply[6]), int(reply[7]),
        )  # fmt: skip


# What lua/capture_finish.lua answers, as a FinishReply.
FINISH_REPLIES = {1: FinishReply.FINISHED, 0: FinishReply.NOT_IN_CLAIM,
                  -1: FinishReply.ENTRIES_NEEDED,
                  2: FinishReply.FINISHED_UNDERSTATED}  # fmt: skip


@dataclass(frozen=True)
class CaptureFinish(ScriptCall[FinishReply]):
    """lua/capture_finish.lua: finishes the claim `claim_token` names (when it began, in ms as
    sent to capture_begin or authorize; '' for whichever claim there is). FINISHED when it did;
    NOT_IN_CLAIM when the hold is in another claim by then, or gone; ENTRIES_NEEDED for a hold a
    rebuild put back, finished CAPTURED without `capture_entries` (nothing done)."""

    SCRIPT = script("capture_finish")
    authorization_id: str
    claim_token: str
    outcome: Finish
    parts: str  # with CAPTURED: the captured parts, "rid=fen;..." (domain/funding.py)
    why: str = ""  # with VOIDED: what a later capture is told instead of ALREADY_VOIDED
    # with CAPTURED: the capture's ledger entries, once read from SQL (None: not read)
    capture_entries: CaptureEntries | None = None

    @property
    def prefix(self) -> str:
        return keys.prefix_of_authorization(self.authorization_id)

    def keys(self) -> list[str]:
        return [keys.authorization(self.authorization_id)]

    def arguments(self) -> list[Argument]:
        entries = self.capture_entries
        return [
            self.prefix,  # 1
            self.outcome.value,  # 2
            self.parts,  # 3
            self.why,  # 4
            self.claim_token,  # 5
            "" if entries is None else "1",  # 6: the capture's ledger entries were read
            "" if entries is None else format_funding(entries),  # 7: "rid=entry;..."
            HOLDS_PER_RECOUNT,  # 8
        ]

    def unpack(self, raw: Reply) -> FinishReply:
        return FINISH_REPLIES[as_integer(raw)]


@dataclass(frozen=True)
class Void(ScriptCall[VoidOutcome]):
    """lua/void.lua: voids a pending hold, its money back to the quotas at once."""

    SCRIPT = script("void")
    authorization_id: str
    merchant_id: str
    now_ms: int

    def keys(self) -> list[str]:
        return [keys.authorization(self.authorization_id)]

    def arguments(self) -> list[Argument]:
        prefix = keys.prefix_of_authorization(self.authorization_id)
        # 4: how long after a put-back hold was listed a claim lost with Redis may commit,
        # clock skew between servers included (lua/_lib.lua lost_claim_may_commit)
        return [prefix, self.now_ms, self.merchant_id, STALE_CAPTURE_SECONDS * 1000]

    def unpack(self, raw: Reply) -> VoidOutcome:
        return VoidOutcome(as_text(raw))


@dataclass(frozen=True)
class ExpireReply:
    expired: int  # holds released as expired
    # due holds taken from the slot's expiry zset: expired, gone already, or a put-back hold
    # awaiting its settlement moved to its bound (lua/_lib.lua); `limit` when more may be due
    taken: int


@dataclass(frozen=True)
class Expire(ScriptCall[ExpireReply]):
    """lua/expire.lua: expires up to `limit` due holds of one slot."""

    SCRIPT = script("expire")
    prefix: str
    now_ms: int
    limit: int

    def keys(self) -> list[str]:
        return [keys.expiry(self.prefix)]

    def arguments(self) -> list[Argument]:
        return [self.prefix, self.now_ms, self.limit]

    def unpack(self, raw: Reply) -> ExpireReply:
        """{how many expired, how many were taken from the expiry zset}."""
        expired, taken = as_list(raw)
        return ExpireReply(as_integer(expired), as_integer(taken))


@dataclass(frozen=True)
class CaptureClear(ScriptCall[bool]):
    """lua/capture_clear.lua: the authorization leaves its slot's capturing zset unless a
    capture holds it (CAPTURING); a PENDING hold gets its own expiry back. True when it is out
    of the zset (or was not in it)."""

    SCRIPT = script("capture_clear")
    authorization_id: str

    @property
    def prefix(self) -> str:
        return keys.prefix_of_authorization(self.authorization_id)

    def keys(self) -> list[str]:
        return [keys.authorization(self.authorization_id)]

    def arguments(self) -> list[Argument]:
        return [self.prefix]

    def unpack(self, raw: Reply) -> bool:
        return as_integer(raw) == 1


def hold_record(raw: Reply) -> HoldRecord | None:
    """An authorization hash (HGETALL) as the scripts write it (lua/_lib.lua names its fields);
    None when Redis has none."""
    flat = as_list(raw)
    fields = {as_text(flat[i]): as_text(flat[i + 1]) for i in range(0, len(flat), 2)}
    if not fields:
        return None
    return HoldRecord(
        merchant_id=fields.get("m", ""),
        beneficiary_id=fields.get("b", ""),
        purpose=fields.get("p", ""),
        status=HoldStatus(fields.get("s", "")),
        approved_fen=int(fields.get("ap", 0)),
        funding=parse_funding(fields.get("f", "")),
        created_ms=int(fields.get("cr", 0)),
        expires_ms=int(fields.get("ex", 0)),
        claim_token=fields.get("cs", ""),
        one_step=fields.get("o") == "1",
        void_reason=fields.get("vr", ""),
        put_back=fields.get("rs") == "1",
    )


def hold_fields(hold: OpenHold, settle_by_ms: int) -> list[Argument]:
    """The authorization hash of an open hold put back from SQL (a rebuild), field by field as
    lua/hold_restore.lua writes it: PENDING, nothing captured, rs = 1 (put back from SQL); and
    sb, until when its expiry waits for the sweeper to settle it (lua/_lib.lua
    awaiting_settlement: the rebuild lists it in the slot's capturing zset)."""
    return [
        "m", hold.merchant_id, "b", hold.beneficiary_id, "p", hold.purpose,
        "s", HoldStatus.PENDING.value, "ap", hold.approved_fen, "cp", 0,
        "f", format_funding(hold.funding), "ex", int(hold.expires_at.timestamp() * 1000),
        "cr", int(hold.created_at.timestamp() * 1000), "d", hold.decision, "r", "", "ck", "",
        "o", 0, "rs", 1, "sb", settle_by_ms,
    ]  # fmt: skip
