"""Each quota script's inputs and reply, and the rate limit's, as one named type (see
script_io.py, whose ScriptCall they are): the one place their KEYS and ARGV order is written
and their reply read."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from authz_server.service.ports import Debit, QuotaFigures, QuotaRestore
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import Argument, Reply, as_integer, as_list, as_text
from authz_server.storage.redis.script_io import ScriptCall
from authz_server.storage.redis.scripts import script


@dataclass(frozen=True)
class QuotaCredit(ScriptCall[bool]):
    """lua/quota_credit.lua: adds money to an active quota, unless a restore counted it
    already. False when the quota is missing or not active (nothing done)."""

    SCRIPT = script("quota_credit")
    beneficiary_id: str
    relationship_id: str
    amount_fen: int
    entry_id: int | str  # the ledger entry of a credit SQL committed first ('' none)
    epoch: str  # the restore epoch a debit being given back was taken in ('' none)

    def keys(self) -> list[str]:
        return [keys.quota(self.beneficiary_id, self.relationship_id)]

    def arguments(self) -> list[Argument]:
        return [self.amount_fen, self.entry_id, self.epoch]

    def unpack(self, raw: Reply) -> bool:
        # 1 added; 2 counted already by a restore; 0 missing or not active
        return as_integer(raw) != 0


@dataclass(frozen=True)
class QuotaDebit(ScriptCall[Debit | None]):
    """lua/quota_debit.lua: takes money from an active quota if its available figure suffices.
    None when it does not (short, missing or not active)."""

    SCRIPT = script("quota_debit")
    beneficiary_id: str
    relationship_id: str
    amount_fen: int

    def keys(self) -> list[str]:
        return [keys.quota(self.beneficiary_id, self.relationship_id)]

    def arguments(self) -> list[Argument]:
        return [self.amount_fen]

    def unpack(self, raw: Reply) -> Debit | None:
        reply = as_list(raw)  # {available or -1, the restore epoch it was taken in}
        available = as_integer(reply[0])
        return None if available < 0 else Debit(available, as_text(reply[1]))


@dataclass(frozen=True)
class QuotaDissolve(ScriptCall[None]):
    """lua/quota_dissolve.lua: marks a quota dissolved and voids its open holds."""

    SCRIPT = script("quota_dissolve")
    beneficiary_id: str
    relationship_id: str

    def keys(self) -> list[str]:
        return [
            keys.quota(self.beneficiary_id, self.relationship_id),
            keys.quota_index(self.beneficiary_id),
        ]

    def arguments(self) -> list[Argument]:
        return [self.relationship_id, keys.prefix(self.beneficiary_id)]

    def unpack(self, raw: Reply) -> None:
        return None


class RestoreRefused(Enum):
    """Why quota_restore.lua did nothing."""

    BUSY = "BUSY"  # a capture of the quota is between its phases
    MOVED = "MOVED"  # its money moved since `version` was read


@dataclass(frozen=True)
class QuotaRestoreCall(ScriptCall[QuotaFigures | RestoreRefused]):
    """lua/quota_restore.lua: sets a quota from the ledger's unused figure, keeping its open
    holds. Refused (nothing done) while a capture of the quota is between its phases (BUSY), or
    when its money moved since `version` was read (MOVED: a restore that arrived late)."""

    SCRIPT = script("quota_restore")
    quota: QuotaRestore
    epoch: str  # the quota's new epoch: a random token, never one it had before
    version: int  # the quota's money version v, read under the same row lock (0: none)

    def keys(self) -> list[str]:
        return [
            keys.quota(self.quota.beneficiary_id, self.quota.relationship_id),
            keys.quota_index(self.quota.beneficiary_id),
        ]

    def arguments(self) -> list[Argument]:
        quota = self.quota
        return [
            quota.relationship_id,  # 1
            quota.holder_id,  # 2
            QUOTA_ACTIVE if quota.active else "DISSOLVED",  # 3
            quota.unused_fen,  # 4
            quota.funding_order,  # 5
            quota.beneficiary_id,  # 6
            quota.beneficiary_scheme,  # 7
            keys.prefix(quota.beneficiary_id),  # 8
            quota.ledger_mark,  # 9: the newest ledger entry SQL's figure counts (r)
            self.epoch,  # 10 (e)
            self.version,  # 11 (v as read)
        ]

    def unpack(self, raw: Reply) -> QuotaFigures | RestoreRefused:
        reply = as_list(raw)  # {available, held}; {-1, -1} BUSY; {-2, -2} MOVED
        # Held is a sum of holds, never below zero: a negative one is a refusal (available may
        # be below zero, the holds over-committing the quota).
        status = as_integer(reply[1])
        if status < 0:
            return RestoreRefused.BUSY if status == -1 else RestoreRefused.MOVED
        return QuotaFigures(available_fen=as_integer(reply[0]), held_fen=as_integer(reply[1]))


# A quota hash's figures, as HMGET reads them: (available, held).
QUOTA_FIGURES = ("available", "held")
# A quota hash's status field, and its value while Authorize may place holds on it.
QUOTA_STATUS = "status"
QUOTA_ACTIVE = "ACTIVE"


def quota_fields(quota: QuotaRestore, held: QuotaFigures | None, epoch: str) -> list[Argument]:
    """A quota's hash as a rebuild from SQL writes it, field by field as quota_restore.lua
    does: ACTIVE with `held` (the ledger's figures less the open holds), or DISSOLVED (None)."""
    if held is None:
        return [
            "status", "DISSOLVED", "available", 0, "held", 0, "holder", quota.holder_id,
            "beneficiary", quota.beneficiary_id, "scheme", quota.beneficiary_scheme,
            "r", quota.ledger_mark, "e", epoch,
        ]  # fmt: skip
    return [
        "status", "ACTIVE", "available", held.available_fen, "held", held.held_fen,
        "holder", quota.holder_id, "order", quota.funding_order,
        "beneficiary", quota.beneficiary_id, "scheme", quota.beneficiary_scheme,
        "r", quota.ledger_mark, "e", epoch,
    ]  # fmt: skip


@dataclass(frozen=True)
class Limit:
    rate_per_second: float
    burst: int
    max_in_flight: int  # 0: no bound

    def __post_init__(self) -> None:
        if self.rate_per_second <= 0 or self.burst < 1 or self.max_in_flight < 0:
            raise ValueError("a limit needs rate > 0, burst >= 1 and in_flight >= 0")


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    retry_after_ms: int = 0
    # "RATE_LIMITED" or "TOO_MANY_IN_FLIGHT" when not admitted
    reason: str = ""


ADMITTED = Verdict(True)
REASONS = {1: "RATE_LIMITED", 2: "TOO_MANY_IN_FLIGHT"}


@dataclass(frozen=True)
class RateLimit(ScriptCall[Verdict]):
    """lua/rate_limit.lua: admits one call of a principal, or says how long to wait."""

    SCRIPT = script("rate_limit")
    principal_key: str
    limit: Limit
    call_id: str
    in_flight_ttl_ms: int
    # ids of the principal's calls ended since its last admission: their slots are freed first
    ended_call_ids: tuple[str, ...] = ()

    def keys(self) -> list[str]:
        return list(keys.rate_limit(self.principal_key))  # the bucket, the calls in flight

    def arguments(self) -> list[Argument]:
        limit = self.limit
        return [
            repr(float(limit.rate_per_second)),
            limit.burst,
            limit.max_in_flight,
            self.call_id,
            self.in_flight_ttl_ms,
            len(self.ended_call_ids),
            *self.ended_call_ids,
        ]

    def unpack(self, raw: Reply) -> Verdict:
        reply = as_list(raw)  # {1, 0, 0} admitted, or {0, retry ms, 1 rate or 2 in flight}
        if as_integer(reply[0]) == 1:
            return ADMITTED
        return Verdict(False, as_integer(reply[1]), REASONS[as_integer(reply[2])])
