"""The small interfaces the services depend on (implemented in authz_server/storage)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from authz_server.domain.funding import Funding
from authz_server.domain.hot_state import OpenHold
from authz_server.domain.model import QuotaFigures
from authz_server.domain.types import Decision, DeclineReason

__all__ = [
    "NOT_WRITTEN",
    "AuthorizeCall",
    "CaptureClaim",
    "CaptureEntries",
    "CaptureOutcome",
    "Debit",
    "Finish",
    "FinishReply",
    "HoldDecision",
    "HoldRecord",
    "HoldStatus",
    "HoldStore",
    "QuotaCache",
    "QuotaFigures",
    "QuotaRestore",
    "VoidOutcome",
]


@dataclass(frozen=True)
class QuotaRestore:
    """What the system of record says a quota should hold (for start-up and reconcile)."""

    relationship_id: str
    beneficiary_id: str
    holder_id: str
    active: bool
    unused_fen: int
    # Funding order: smaller is drawn first (the relationship's activation time in ms).
    funding_order: int
    # The beneficiary's scheme (the resident premium is only for residents). It cannot change
    # while the relationship is active: a change of scheme passes through termination.
    beneficiary_scheme: str
    # The relationship's newest ledger entry when SQL was read: credits up to it are counted in
    # unused_fen already, and are not added again when their Redis step comes late.
    ledger_mark: int


@dataclass(frozen=True)
class Debit:
    """Money taken from a quota's available figure."""

    available_fen: int  # what is left
    # The quota's restore epoch when taken: a give-back is skipped if a restore came since
    # (the restore set the figure from SQL, which never had the debit).
    epoch: str


class QuotaCache(Protocol):
    """Quota balances and holds in Redis; every change is one atomic Lua script."""

    async def credit(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int, entry_id: int
    ) -> bool:
        """Adds a credit SQL committed (ledger entry `entry_id`) to available, unless a restore
        counted it already. False when the quota is not there or not active (nothing done)."""
        ...

    async def give_back(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int, epoch: str
    ) -> None:
        """Returns a debit SQL did not commit, unless a restore came since it was taken."""
        ...

    async def debit(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int
    ) -> Debit | None:
        """Takes from available if it suffices; None if short (nothing done)."""
        ...

    async def dissolve(self, beneficiary_id: str, relationship_id: str) -> None:
        """Marks the quota dissolved, voiding its holds; later credits are refused."""
        ...

    async def restore(self, quota: QuotaRestore) -> QuotaFigures | None:
        """Sets a quota from the ledger's figure, keeping its open holds; the caller holds the
        relationship's row lock since it read the figure. None (nothing done) while a capture
        of the quota is between its phases, or when its money moved between the restore's own
        read of the quota and its write (a restore that reached Redis late: it must not count
        back what moved after the lock was let go)."""
        ...

    async def figures(
        self, beneficiary_id: str, relationship_ids: list[str]
    ) -> dict[str, QuotaFigures]:
        """The live figures of the given quotas; a quota not in the cache is left out."""
        ...

    async def still_active(
        self, beneficiary_id: str, relationship_ids: list[str]
    ) -> dict[str, QuotaFigures]:
        """The figures of those of the given quotas the cache has as active (holds may be
        placed on them); the others (dissolved, or not in the cache) are left out."""
        ...


# --- holds (the hot state's authorizations) ------------------------------------------------


class HoldStatus(StrEnum):
    """An authorization's status in the hot state."""

    PENDING = "PENDING"
    CAPTURING = "CAPTURING"  # a capture between its phases, or a one-step payment being made
    CAPTURED = "CAPTURED"
    VOIDED = "VOIDED"
    EXPIRED = "EXPIRED"
    DECLINED = "DECLINED"


# A capture whose transaction has not taken its quotas' locks this long after its hold was
# claimed is not written (UNAVAILABLE; the till retries; service/capture_writer.py). The sweeper
# settles a claim still CAPTURING after STALE_CAPTURE_SECONDS as SQL says, under the same locks:
# a capture still waiting in a queue then must never be written after SQL was read as not
# having it, or the hold would be put back while SQL counts its money as spent. Well below the
# sweeper's 30 s, leaving room for clock skew between hosts (the sweeper's bound is also how long
# after a rebuild put a hold back void.lua and capture_begin.lua let a claim lost with Redis
# commit: lua/_lib.lua lost_claim_may_commit).
CAPTURE_WRITE_DEADLINE_SECONDS = 10
# A capture still CAPTURING this long after it began lost its process (or its Redis reply):
# it is settled as SQL says. Far above a capture's SQL time, so live ones are never touched.
STALE_CAPTURE_SECONDS = 30


class CaptureOutcome(StrEnum):
    """What claiming a hold for a capture answered. A voided hold answers why it was voided
    (ALREADY_VOIDED, RELATIONSHIP_NOT_ACTIVE, LEDGER_LIMIT_EXCEEDED)."""

    OK = "OK"
    REPLAY = "REPLAY"  # captured already with this capture key
    # a capture of it is being written (this key's or another's: either may still fail); or the
    # hold, put back by a rebuild and past its expiry, may still get a capture claimed in the
    # Redis that was lost (within STALE_CAPTURE_SECONDS of its put-back)
    IN_PROGRESS = "IN_PROGRESS"
    # its capture began too long ago: its process lost the thread; or the hold, put back by a
    # rebuild and past its expiry, awaits its settlement as SQL says (it may be captured)
    STALLED = "STALLED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_CAPTURED = "ALREADY_CAPTURED"
    ALREADY_VOIDED = "ALREADY_VOIDED"
    AUTHORIZATION_EXPIRED = "AUTHORIZATION_EXPIRED"
    AUTHORIZATION_DECLINED = "AUTHORIZATION_DECLINED"
    CAPTURE_EXCEEDS_APPROVED = "CAPTURE_EXCEEDS_APPROVED"
    RELATIONSHIP_NOT_ACTIVE = "RELATIONSHIP_NOT_ACTIVE"
    LEDGER_LIMIT_EXCEEDED = "LEDGER_LIMIT_EXCEEDED"


class VoidOutcome(StrEnum):
    OK = "OK"  # voided now, or before
    NOT_FOUND = "NOT_FOUND"
    ALREADY_CAPTURED = "ALREADY_CAPTURED"
    # its write may still fail: pending again; or, put back by a rebuild and past its expiry,
    # a capture claimed in the Redis that was lost may still commit
    CAPTURE_IN_PROGRESS = "CAPTURE_IN_PROGRESS"
    AUTHORIZATION_EXPIRED = "AUTHORIZATION_EXPIRED"
    AUTHORIZATION_DECLINED = "AUTHORIZATION_DECLINED"


class Finish(StrEnum):
    """How a capture's claim on a hold ends, as SQL answered."""

    CAPTURED = "CAPTURED"  # the captured parts leave the quotas, the rest returns
    VOIDED = "VOIDED"  # the whole hold returns
    PENDING = "PENDING"  # the hold is put back as it was (a retry may capture it)


class FinishReply(StrEnum):
    """What finishing a capture's claim on a hold answered."""

    FINISHED = "FINISHED"
    NOT_IN_CLAIM = "NOT_IN_CLAIM"  # the hold is in another claim by then, or gone: nothing done
    # A hold a rebuild put back (its claim lost with Redis), finished as CAPTURED without the
    # capture's ledger entries: nothing done. Only they tell whether a quota restore since
    # counted the capture as spent already (HoldStore.capture_finish); call again with them.
    ENTRIES_NEEDED = "ENTRIES_NEEDED"
    # Finished, but a quota with too many holds to recount (HOLDS_PER_RECOUNT) had the part
    # released as taken: it may be understated (never overstated) until set from the ledger.
    FINISHED_UNDERSTATED = "FINISHED_UNDERSTATED"


# Why a one-step payment was voided when SQL turned out not to have it: nothing was paid, so a
# retry with the same key makes the payment (HoldStore.forget_unwritten); a capture of it is
# refused ALREADY_VOIDED.
NOT_WRITTEN = "NOT_WRITTEN"


# A capture's CAPTURE ledger entries: (relationship id, ledger_entries.entry_id), one per quota
# it drew from. A quota whose restore mark (QuotaRestore.ledger_mark) is at least its entry was
# set from SQL after the capture committed: its figure counts the capture as spent already.
CaptureEntries = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class AuthorizeCall:
    """One Authorize, as the hot state decides it."""

    authorization_id: str
    merchant_id: str
    beneficiary_id: str
    idempotency_key: str
    purpose: str
    request_digest: str
    eligible_fen: int  # what may be paid (the precheck's eligible lines)
    allow_partial: bool
    relationship_id: str  # '' for any of the beneficiary's quotas
    expires_at_ms: int
    decided_decline: str  # a decline reason decided before ('' none)
    capture_at_once: bool  # a one-step payment
    requires_resident: bool
    template: str  # the precheck's lines, kept for replays
    requested_fen: int


@dataclass(frozen=True)
class HoldDecision:
    """What the hot state decided for an Authorize (new, or replayed for its key)."""

    replayed: bool
    authorization_id: str
    decision: Decision
    decline_reason: DeclineReason | None
    approved_fen: int
    funding: Funding
    remaining_fen: int
    status: HoldStatus
    expires_at_ms: int
    template: str
    # The hot state's generation the decision was made in ('' without one: tools, tests); the
    # journal refuses a decision of a generation no longer published (service/journal.py).
    generation: str = ""


@dataclass(frozen=True)
class CaptureClaim:
    """What claiming a hold for a capture answered, with the hold's figures (zero and empty for
    NOT_FOUND)."""

    outcome: CaptureOutcome
    approved_fen: int
    amount_fen: int  # what this capture takes (the approved amount when asked for 0)
    funding: Funding
    beneficiary_id: str
    purpose: str
    created_ms: int = 0
    expires_ms: int = 0


@dataclass(frozen=True)
class HoldRecord:
    """An authorization as the hot state has it."""

    merchant_id: str
    beneficiary_id: str
    purpose: str
    status: HoldStatus
    approved_fen: int
    funding: Funding
    created_ms: int
    expires_ms: int
    # The claim a capture holds ('' none): its token for capture_finish.
    claim_token: str
    one_step: bool  # a one-step payment (voided, not put back, when SQL never had it)
    void_reason: str  # why it was voided ('' when voided by a Void)
    # Put back from SQL by a rebuild (or hold_restore): a capture claimed in the Redis that was
    # lost may have committed since. Such a hold, still PENDING, is settled as SQL says by the
    # sweeper (capture_recovery.settle_capture) before its expiry may release it.
    put_back: bool


class HoldStore(Protocol):
    """Authorizations and their holds in the hot state, one atomic step per call
    (implemented by storage/redis/hold_store.py)."""

    def new_authorization_id(self, beneficiary_id: str) -> str:
        """An id for a new authorization of this beneficiary."""
        ...

    async def authorize(self, call: AuthorizeCall, now_ms: int) -> HoldDecision | None:
        """Decides an Authorize, or answers its key's first decision (replayed). None when the
        key was used before with another request."""
        ...

    async def undo(self, call: AuthorizeCall, authorization_id: str) -> None:
        """Forgets a decision made for `call`'s key: its hold goes back to the quotas."""
        ...

    async def restore_hold(self, hold: OpenHold, now_ms: int) -> bool:
        """Places an approved hold SQL has and the hot state lost. True when placed."""
        ...

    async def forget_unwritten(self, call: AuthorizeCall, authorization_id: str) -> bool:
        """Forgets the key's decision if it is a one-step payment voided NOT_WRITTEN. True when
        the key no longer names that decision: the call must ask again."""
        ...

    async def capture_begin(
        self, authorization_id: str, merchant_id: str, key: str, amount_fen: int, now_ms: int
    ) -> CaptureClaim:
        """Claims a pending hold for a capture (CAPTURING)."""
        ...

    async def capture_finish(
        self,
        authorization_id: str,
        claim_token: str,
        outcome: Finish,
        parts: str,
        why: str = "",
        capture_entries: CaptureEntries | None = None,
    ) -> FinishReply:
        """Finishes the claim `claim_token` names ('' any) as SQL answered. A hold a rebuild put
        back answers ENTRIES_NEEDED to CAPTURED until `capture_entries` (the capture's ledger
        entries, read from SQL) come with it."""
        ...

    async def clear_capture(self, authorization_id: str, expires_ms: int) -> bool:
        """Takes the authorization out of the holds the sweeper settles as SQL says, unless a
        capture holds it (CAPTURING: False). For a hold a rebuild put back that SQL says has no
        capture: an ordinary open hold from then on, expiring at `expires_ms` (its own)."""
        ...

    async def void(self, authorization_id: str, merchant_id: str, now_ms: int) -> VoidOutcome:
        """Voids a pending hold: its money returns at once."""
        ...

    async def get(self, authorization_id: str) -> HoldRecord | None:
        """The authorization as the hot state has it; None when it does not know it."""
        ...
