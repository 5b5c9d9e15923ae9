"""AuthorizationService: two-phase payments from the shared quota (authorize, capture, void,
refund), in the manner of TigerBeetle's pending/post/void/timeout transfers.

- Authorize is one Redis round trip (storage/redis/lua/authorize.lua); its decision is
  journaled to SQL in batches afterwards (service/journal.py).
- Capture claims the hold in Redis, writes the capture to SQL in a set-based batch
  (service/capture_writer.py), then settles the hold in Redis. Refund is written to SQL
  first, then credited to the quota (service/refunds.py).
- Dissolution voids open holds; a hold whose relationship was dissolved cannot be captured
  (RELATIONSHIP_NOT_ACTIVE), because the capture re-checks the relationship in SQL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy.orm import Session

from authz_server.domain import authorization as rules
from authz_server.domain.errors import (
    DomainError,
    IdempotencyKeyReused,
    InvalidArgument,
    LedgerLimitExceeded,
    NotFound,
    PolicyRefusal,
    Unavailable,
)
from authz_server.domain.funding import Funding, format_funding, parse_funding
from authz_server.domain.hot_state import OpenHold
from authz_server.domain.types import (
    AuthorizationStatus,
    Decision,
    DeclineReason,
    Purpose,
)
from authz_server.observability import metrics
from authz_server.service import idempotency
from authz_server.service.capture_recovery import (
    captured_as_sql_says,
    finish_captured,
    settle_capture,
)
from authz_server.service.capture_writer import CapturedInLedger, CaptureUnit, CaptureWriter
from authz_server.service.clock import Clock, system_clock
from authz_server.service.idempotency import Idempotency
from authz_server.service.journal import DecisionJournal, GenerationChanged, StoredDecision
from authz_server.service.late_journal import LateJournal
from authz_server.service.lost_authorizations import LostState, lost_state, read_lost_state
from authz_server.service.ports import (
    NOT_WRITTEN,
    AuthorizeCall,
    CaptureClaim,
    CaptureOutcome,
    Finish,
    FinishReply,
    HoldDecision,
    HoldStatus,
    HoldStore,
    QuotaCache,
    VoidOutcome,
)
from authz_server.service.quota_sync import restore_from_ledger, when_rebuilt
from authz_server.service.reference_cache import ReferenceCache
from authz_server.service.refunds import RefundOutcome, Refunds
from authz_server.service.to_the_end import ToTheEnd
from authz_server.service.views import AuthorizationView
from authz_server.storage.sql import records
from authz_server.storage.sql.capture_batch import payment_scope
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.group_commit import GroupCommit
from authz_server.storage.sql.open_holds import (
    LedgerVoid,
    mark_voided,
    open_holds,
    void_in_ledger,
)
from authz_server.storage.sql.tables import (
    AuthorizationRow,
    CaptureRow,
    IdempotencyRecordRow,
)


class Serializable(Protocol):
    """A response message (protobuf), serialized only when the journal writes it."""

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


log = logging.getLogger(__name__)
R = TypeVar("R", bound=Serializable)
T = TypeVar("T")
# An authorization Redis does not know, as SQL says (service/lost_authorizations.py): what a
# capture or void of it is refused with, and the status GetAuthorization shows. A capture that
# may still commit is answered UNAVAILABLE (retry), and shown pending meanwhile.
LOST_REFUSALS = {
    LostState.CAPTURED: "ALREADY_CAPTURED",
    LostState.DECLINED: "AUTHORIZATION_DECLINED",
    LostState.EXPIRED: "AUTHORIZATION_EXPIRED",
    LostState.VOIDED: "ALREADY_VOIDED",
}
LOST_STATUSES = {
    LostState.CAPTURED: AuthorizationStatus.CAPTURED,
    LostState.DECLINED: AuthorizationStatus.DECLINED,
    LostState.EXPIRED: AuthorizationStatus.EXPIRED,
    LostState.CAPTURE_MAY_COMMIT: AuthorizationStatus.PENDING,
    LostState.VOIDED: AuthorizationStatus.VOIDED,
}
CAPTURE_REFUSALS = frozenset(
    {CaptureOutcome.ALREADY_CAPTURED, CaptureOutcome.ALREADY_VOIDED,
     CaptureOutcome.AUTHORIZATION_EXPIRED, CaptureOutcome.AUTHORIZATION_DECLINED,
     CaptureOutcome.RELATIONSHIP_NOT_ACTIVE, CaptureOutcome.LEDGER_LIMIT_EXCEEDED}
)  # fmt: skip


@dataclass(frozen=True)
class AuthorizeOutcome:
    authorization_id: str
    decision: Decision
    decline_reason: DeclineReason | None
    approved_fen: int
    lines: tuple[rules.LineResult, ...]
    funding: Funding
    remaining_fen: int
    expires_at: datetime | None
    status: AuthorizationStatus


def split_capture(funding: Funding, amount_fen: int) -> Funding:
    """A capture of less than approved is drawn from the funding parts in order."""
    left, parts = amount_fen, []
    for relationship_id, approved in funding:
        take = min(left, approved)
        left -= take
        parts.append((relationship_id, take))
    return tuple(parts)


def encode_lines(lines: tuple[rules.LineResult, ...]) -> str:
    """The precheck's line results, kept with the idempotency record for replays."""
    return "\n".join(
        f"{line.item_code}|{int(line.approved)}|{line.decline_reason or ''}|"
        f"{line.approved_amount_fen}"
        for line in lines
    )


def decode_lines(text: str) -> tuple[rules.LineResult, ...]:
    lines = []
    for row in filter(None, text.split("\n")):
        code, approved, reason, amount = row.split("|")
        lines.append(
            rules.LineResult(
                code, approved == "1", DeclineReason(reason) if reason else None, int(amount)
            )
        )
    return tuple(lines)


def declined_lines(
    lines: tuple[rules.LineResult, ...], reason: DeclineReason
) -> tuple[rules.LineResult, ...]:
    """A declined decision's lines: those the precheck let through are declined for `reason`
    (the lines it refused keep their own reason)."""
    return tuple(
        line if not line.approved else rules.LineResult(line.item_code, False, reason, 0)
        for line in lines
    )


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _whole_milliseconds(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _from_ms(value: int) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, UTC) if value else None


class AuthorizationService:
    def __init__(
        self,
        database: Database,
        holds: HoldStore,
        quotas: QuotaCache,
        group_commit: GroupCommit,
        journal: DecisionJournal,
        references: ReferenceCache,
        pharmacy_hold_seconds: int,
        medical_hold_seconds: int,
        clock: Clock = system_clock,
    ) -> None:
        self.database = database
        self.holds = holds
        self.quotas = quotas
        self.group_commit = group_commit
        self.captures = CaptureWriter(database, metrics.BatchObserver("captures"), clock)
        self.journal = journal
        self.references = references
        self.pharmacy_hold_seconds = pharmacy_hold_seconds
        self.medical_hold_seconds = medical_hold_seconds
        self.clock = clock
        # An Authorize, a claimed capture, a void or a refund runs to its end even when its
        # call is cancelled (a deadline): its write may commit after the cancel, and Redis and
        # SQL must follow each other.
        self.to_the_end = ToTheEnd("authorize, capture, void or refund")
        # Decision rows the journal did not take, submitted again in the background.
        self.late_journal = LateJournal(journal)
        self.refunds = Refunds(database, quotas, group_commit, self.to_the_end, self.get, clock)

    # --- Authorize -------------------------------------------------------------------------

    async def authorize(
        self,
        request: rules.AuthorizeRequest,
        request_digest: str,
        respond: Callable[[AuthorizeOutcome], R],
    ) -> R | bytes:
        """Decides and answers `respond(outcome)`: the transport's response, built once for the
        caller and the journal; or, bytes, the response SQL stored for the key before."""
        rules.check_request(request)
        merchant = self.references.merchants.get(request.merchant_id)
        precheck = rules.precheck(request, merchant, self.references.catalog)
        # To the millisecond, as Redis keeps the authorization's times: the journal's created_at
        # is then the one Redis shows, and GetAuthorization answers the same time after Redis
        # has lost or dropped the hash as before.
        now = _whole_milliseconds(self.clock())
        hold_seconds = rules.hold_seconds(
            request.purpose, self.pharmacy_hold_seconds, self.medical_hold_seconds
        )
        call = AuthorizeCall(
            authorization_id=self.holds.new_authorization_id(request.beneficiary_id),
            merchant_id=request.merchant_id,
            beneficiary_id=request.beneficiary_id,
            idempotency_key=request.idempotency_key,
            purpose=request.purpose.value,
            request_digest=request_digest,
            eligible_fen=precheck.eligible_fen,
            allow_partial=request.allow_partial,
            relationship_id=request.relationship_id or "",
            expires_at_ms=_ms(now) + hold_seconds * 1000,
            decided_decline=precheck.decline_reason.value if precheck.decline_reason else "",
            capture_at_once=request.captures_at_once,
            requires_resident=request.purpose is Purpose.RESIDENT_PREMIUM,
            template=encode_lines(precheck.lines),
            requested_fen=request.amount_fen,
        )
        # Decided, journaled and answered to the end even when the call is cancelled (its
        # deadline) meanwhile. authorize.lua places the hold whether or not its caller still
        # waits (a cancelled caller's command is still sent): a hold left unjournaled would hold
        # the family's money in Redis until it expired, SQL knowing nothing; a claim conflict
        # left undone, the same. And a one-step payment SQL made without the key's journal row
        # would be made again by a retry once Redis lost the key. Costs ~4.5 µs a call (a task
        # and a shield; loadtest/RESULTS.md).
        return await self.to_the_end.run(
            self._decide_and_answer(request, request_digest, call, now, respond)
        )

    async def _decide_and_answer(
        self,
        request: rules.AuthorizeRequest,
        request_digest: str,
        call: AuthorizeCall,
        now: datetime,
        respond: Callable[[AuthorizeOutcome], R],
    ) -> R | bytes:
        decision = await self._decide(call, _ms(now))
        if decision.replayed:
            metrics.idempotent_replays.labels("Authorize").inc()
            outcome = await self._replayed(decision)
        else:
            outcome = self._outcome(decision)
            if decision.status is HoldStatus.CAPTURING:
                return await self._pay_and_answer(
                    request, request_digest, call, decision, outcome, now, respond
                )
            _count(request.purpose, outcome)
        return await self._answer(request, request_digest, call, decision, outcome, now, respond)

    async def _pay_and_answer(
        self,
        request: rules.AuthorizeRequest,
        request_digest: str,
        call: AuthorizeCall,
        decision: HoldDecision,
        outcome: AuthorizeOutcome,
        now: datetime,
        respond: Callable[[AuthorizeOutcome], R],
    ) -> R | bytes:
        """A one-step payment: its capture, then its journal row and its answer (or, when its
        key paid before, that payment's stored answer)."""
        paid = await self._capture_at_once(request, outcome, now, call, respond)
        if isinstance(paid, bytes):
            metrics.idempotent_replays.labels("Authorize").inc()
            return paid
        _count(request.purpose, paid)
        return await self._answer(request, request_digest, call, decision, paid, now, respond)

    async def _answer(
        self,
        request: rules.AuthorizeRequest,
        request_digest: str,
        call: AuthorizeCall,
        decision: HoldDecision,
        outcome: AuthorizeOutcome,
        now: datetime,
        respond: Callable[[AuthorizeOutcome], R],
    ) -> R | bytes:
        """The decision journaled, then answered (or SQL's stored answer for its key)."""
        response = respond(outcome)
        # Durable before the till hears it (service/journal.py): an approval survives the loss of
        # Redis, and SQL's unique key is the last word on which decision a key has. A replay is
        # journaled too (kept once): its first call may never have been.
        stored = await self._journaled(
            call,
            decision,
            {
                "authorization_id": outcome.authorization_id,
                "merchant_id": request.merchant_id,
                "beneficiary_id": request.beneficiary_id,
                "purpose": request.purpose.value,
                "decision": outcome.decision.value,
                "decline_reason": outcome.decline_reason.value if outcome.decline_reason else None,
                "requested_fen": request.amount_fen,
                "approved_fen": outcome.approved_fen,
                "funding": format_funding(outcome.funding),
                "idempotency_key": request.idempotency_key,
                "request_digest": request_digest,
                "response": response,
                "created_at": now,
                "expires_at": outcome.expires_at,
                # not a column: the journal refuses a hold decided in a generation no longer
                # published (Redis lost, or being rebuilt, since): a rebuild that read SQL
                # before this row would not have put the hold back. Payments made and declines
                # hold no money in Redis, and are journaled whatever the generation.
                "generation": decision.generation
                if outcome.status is AuthorizationStatus.PENDING
                else "",
            },
        )
        if stored is not None:
            # A decision made anew (or a stray record Redis kept) is undone; never a payment
            # already made (a one-step payment's capture).
            undo = decision.status in (HoldStatus.PENDING, HoldStatus.DECLINED)
            return await self._stored_answer(
                call, stored, decision.authorization_id if undo else None
            )
        if (
            decision.status is HoldStatus.PENDING
            and not decision.replayed
            and not decision.generation
        ):
            # Without a generation (a store that has none: tools) the hold is checked here.
            # With one, the journal committed this row only while the generation the hold was
            # placed in was still published, under the fence a rebuild waits on: a rebuild
            # since reads this row and puts the hold back itself.
            await self._keep_hold(
                OpenHold(
                    outcome.authorization_id, request.merchant_id, request.beneficiary_id,
                    request.purpose.value, outcome.decision.value, outcome.approved_fen,
                    outcome.funding, now, outcome.expires_at or now,
                )
            )  # fmt: skip
        return response

    async def _journaled(
        self, call: AuthorizeCall, decision: HoldDecision, row: dict[str, Any]
    ) -> StoredDecision | None:
        """journal.write(row). A decision that holds money (a hold, a payment made) the journal
        does not take is handed to the late journal (service/late_journal.py), which submits the
        same row again in the background: left unjournaled, its hold would hold the family's
        money in Redis until it expired, SQL knowing nothing. The call answers UNAVAILABLE at
        once, as before. Not a decision of a generation no longer published (GenerationChanged):
        the rebuild drops its hold."""
        try:
            return await self.journal.write(row)
        except GenerationChanged:
            raise
        except Unavailable:
            if decision.status is HoldStatus.PENDING:
                self.late_journal.hand(
                    row, functools.partial(self.holds.undo, call, decision.authorization_id)
                )
            elif decision.status is HoldStatus.CAPTURING:  # a payment made: never undone
                self.late_journal.hand(row, None)
            raise

    async def _stored_answer(
        self, call: AuthorizeCall, stored: StoredDecision, undo_id: str | None
    ) -> bytes:
        """SQL answered this key before, under another authorization (Redis lost the record):
        the decision `undo_id` Redis has for it is undone, and the key gets SQL's answer (its
        hold put back if it is still open), or IDEMPOTENCY_KEY_REUSED for another request."""
        if undo_id is not None:
            await self.holds.undo(call, undo_id)
        if stored.request_digest != call.request_digest:
            raise IdempotencyKeyReused(call.idempotency_key)
        metrics.idempotent_replays.labels("Authorize").inc()
        hold = await self.database.run(
            lambda session: next(
                iter(open_holds(session, self.clock(), authorization_id=stored.authorization_id)),
                None,
            )
        )
        if hold is not None:
            await self._keep_hold(hold)
        return stored.response

    async def _keep_hold(self, hold: OpenHold) -> None:
        """Makes sure Redis holds an approval SQL has: a rebuild of the hot state that read SQL
        before the decision was committed did not put it back. One round trip that changes
        nothing when Redis knows the authorization; while a rebuild runs, it waits for it (the
        approval is in SQL, so it must be capturable after)."""
        if await when_rebuilt(lambda: self.holds.restore_hold(hold, _ms(self.clock()))):
            log.warning(
                "authorization %s: hold put back from SQL", hold.authorization_id,
                extra={"authorization_id": hold.authorization_id},
            )  # fmt: skip

    async def _decide(self, call: AuthorizeCall, now_ms: int) -> HoldDecision:
        """authorize.lua's decision (new, or the key's first). A one-step payment whose first
        attempt was voided because SQL never had it paid nothing: its decision is forgotten and
        this retry decides anew. When a retry racing this one forgot it first, this one asks
        again and gets the decision that retry made (or makes it). `call`'s own id is still
        unused after a replay, so the second ask may use it."""
        decision = await self.holds.authorize(call, now_ms)
        if (
            decision is not None
            and decision.replayed
            and decision.status is HoldStatus.CAPTURING
            and await self.holds.forget_unwritten(call, decision.authorization_id)
        ):
            decision = await self.holds.authorize(call, now_ms)
        if decision is None:
            raise IdempotencyKeyReused(call.idempotency_key)
        return decision

    def _outcome(self, decision: HoldDecision) -> AuthorizeOutcome:
        approved = decision.decision is not Decision.DECLINED
        lines = decode_lines(decision.template)
        if approved:
            lines = rules.distribute(lines, decision.approved_fen)
        elif decision.decline_reason:
            lines = declined_lines(lines, decision.decline_reason)
        # A one-step payment is CAPTURING until its capture is written: PENDING until then.
        # (Not dict.get(status, AuthorizationStatus(status)): the default is built eagerly,
        # and there is no AuthorizationStatus "CAPTURING".)
        status = (
            AuthorizationStatus.PENDING
            if decision.status is HoldStatus.CAPTURING
            else AuthorizationStatus(decision.status.value)
        )
        return AuthorizeOutcome(
            authorization_id=decision.authorization_id,
            decision=decision.decision,
            decline_reason=decision.decline_reason,
            approved_fen=decision.approved_fen,
            lines=lines,
            funding=decision.funding,
            remaining_fen=decision.remaining_fen,
            expires_at=_from_ms(decision.expires_at_ms) if approved else None,
            status=status,
        )

    async def _replayed(self, decision: HoldDecision) -> AuthorizeOutcome:
        outcome = self._outcome(decision)
        if decision.status is not HoldStatus.CAPTURING:
            return outcome
        # A one-step payment: answer with how its capture ended (or retry while it runs).
        hold = await self.holds.get(decision.authorization_id)
        current = hold.status if hold is not None else None
        if current is HoldStatus.CAPTURED:
            return _with_status(outcome, AuthorizationStatus.CAPTURED)
        if hold is not None and current is HoldStatus.VOIDED and hold.void_reason == NOT_WRITTEN:
            # Voided just now, after _decide looked (the sweeper): nothing was paid, and the
            # next retry makes the payment. Not DECLINED: that answer would be journaled.
            raise Unavailable("the payment was not made; retry with the same key to make it")
        if current is HoldStatus.VOIDED:
            return _declined(outcome, DeclineReason.RELATIONSHIP_NOT_ACTIVE)
        raise Unavailable("the payment is still being written; retry")

    async def _capture_at_once(
        self,
        request: rules.AuthorizeRequest,
        outcome: AuthorizeOutcome,
        now: datetime,
        call: AuthorizeCall,
        respond: Callable[[AuthorizeOutcome], Serializable],
    ) -> AuthorizeOutcome | bytes:
        """Pays a one-step payment. Its answer is stored under its idempotency key in the
        capture's own transaction, so a key that paid once never pays again, even when Redis
        lost the decision and the journal never got the row (a crash just after the capture):
        the capture writer answers such a key with the stored response (bytes), and the
        decision just made is undone."""
        claim_token = str(_ms(now))  # when authorize.lua began the payment's claim: its cs
        answer = respond(_with_status(outcome, AuthorizationStatus.CAPTURED)).SerializeToString()
        paid_once = Idempotency[AuthorizationView](
            payment_scope(request.merchant_id),
            request.idempotency_key,
            call.request_digest,
            lambda _view: answer,
        )
        try:
            written = await self._write_capture(
                outcome.authorization_id,
                request.merchant_id,
                request.beneficiary_id,
                request.purpose,
                outcome.approved_fen,
                outcome.funding,
                outcome.funding,
                paid_once,
                now,
            )
        except IdempotencyKeyReused:  # the key paid for another request: nothing paid here
            await self.holds.undo(call, outcome.authorization_id)
            raise
        except CapturedInLedger as captured:  # SQL has it already: settle the hold as SQL says
            await self._finish_captured(
                outcome.authorization_id, claim_token, captured.parts, outcome.funding
            )
            return _with_status(outcome, AuthorizationStatus.CAPTURED)
        except LedgerLimitExceeded as refusal:
            # Redis approved what the ledger cannot pay; nothing was paid, so NOT_WRITTEN: a
            # retry with this key decides anew (on the healed figure) instead of a replay.
            await self.holds.capture_finish(
                outcome.authorization_id, claim_token, Finish.VOIDED, "", NOT_WRITTEN
            )
            await self._heal_overstated_quota(refusal)
            raise
        except PolicyRefusal:  # the relationship was dissolved in between
            await self.holds.capture_finish(
                outcome.authorization_id, claim_token, Finish.VOIDED, ""
            )
            return _declined(outcome, DeclineReason.RELATIONSHIP_NOT_ACTIVE)
        except BaseException:
            settled = await self._settle_unfinished_payment(outcome, claim_token)
            if settled is not None:
                return settled
            raise
        if isinstance(written, bytes):  # the key paid before: its answer, nothing paid now
            await self.holds.undo(call, outcome.authorization_id)
            return written
        await self._finish_captured(
            outcome.authorization_id, claim_token, format_funding(outcome.funding), outcome.funding
        )
        return _with_status(outcome, AuthorizationStatus.CAPTURED)

    async def _finish_captured(
        self, authorization_id: str, claim_token: str, parts: str, funding: Funding
    ) -> None:
        """Finishes the hold of a capture SQL has, as CAPTURED (a hold a rebuild put back as
        well: finish_captured). When Redis no longer has that claim (Redis was lost and rebuilt
        from SQL read before this capture committed: the rebuild counted its money as unused),
        the funding quotas are set from the ledger again, or Redis would go on offering money
        SQL counts as spent."""
        finished = await when_rebuilt(
            lambda: finish_captured(self.database, self.holds, authorization_id, claim_token, parts)
        )
        if finished is FinishReply.FINISHED:
            return
        # NOT_IN_CLAIM, or FINISHED_UNDERSTATED (a quota with too many holds to recount)
        for relationship_id, _ in funding:
            try:
                await restore_from_ledger(self.database, self.quotas, relationship_id)
            except Unavailable as error:  # a capture between its phases: reconcile settles it
                log.warning(
                    "capture %s: quota %s not restored from the ledger: %s",
                    authorization_id, relationship_id, error,
                    extra={"authorization_id": authorization_id},
                )  # fmt: skip

    async def _settle_unfinished_payment(
        self, outcome: AuthorizeOutcome, claim_token: str
    ) -> AuthorizeOutcome | None:
        """A one-step payment whose capture failed without a refusal: settled as SQL says
        (`_settle_as_sql_says`; when SQL has nothing, voided as NOT_WRITTEN, so a retry with
        its key pays anew). CAPTURED when SQL has it; None (the caller raises the failure)
        otherwise."""
        settled = await self._settle_as_sql_says(
            outcome.authorization_id, claim_token, outcome.funding, Finish.VOIDED, None, NOT_WRITTEN
        )
        if settled is None or not settled[0]:
            return None
        return _with_status(outcome, AuthorizationStatus.CAPTURED)

    # --- Capture ---------------------------------------------------------------------------

    async def capture(
        self,
        merchant_id: str,
        authorization_id: str,
        amount_fen: int,
        call: Idempotency[AuthorizationView],
        resumed: bool = False,
        put_back: bool = False,
    ) -> AuthorizationView | bytes:
        now = self.clock()
        claim = await self.holds.capture_begin(
            authorization_id, merchant_id, call.key, amount_fen, _ms(now)
        )
        if claim.outcome is CaptureOutcome.NOT_FOUND:
            if not put_back and await self._put_back_if_open(merchant_id, authorization_id):
                return await self.capture(
                    merchant_id, authorization_id, amount_fen, call, resumed, put_back=True
                )
            return await self._capture_without_hold(merchant_id, authorization_id, amount_fen, call)
        if claim.outcome is CaptureOutcome.REPLAY:
            return await self._capture_replay(merchant_id, authorization_id, amount_fen, call)
        if claim.outcome is CaptureOutcome.STALLED and not resumed:
            # A claim of it (this key's earlier attempt, or another key's) lost its way between
            # SQL and Redis, or the hold, put back by a rebuild and past its expiry, awaits its
            # settlement (a capture claimed before the loss may have committed): settle it as
            # SQL says, then answer this retry as if it came first or again. Its key's answer
            # first: a hold put back and settled CAPTURED does not know the key its capture had.
            await settle_capture(self.database, self.holds, authorization_id, _ms(self.clock()))
            replay = await self.database.run(lambda session: idempotency.find(session, call))
            if replay is not None:
                return replay
            return await self.capture(merchant_id, authorization_id, amount_fen, call, True)
        if claim.outcome is CaptureOutcome.IN_PROGRESS:
            # A capture of it is under way: this key's, or committed and lost its Redis step (a
            # stall), or another key's, which may still fail (a Void marked SQL first), so this
            # till is not told ALREADY_CAPTURED; or a capture claimed in the Redis that was lost
            # may still commit to a put-back hold. Once SQL has this key's answer (its capture
            # committed; the hold put back, claimed since by another key), the hold is finished
            # as SQL says and the retry gets that answer, rather than waiting
            # STALE_CAPTURE_SECONDS for the sweeper.
            replay = await self.database.run(lambda session: idempotency.find(session, call))
            if replay is not None:
                await settle_capture(self.database, self.holds, authorization_id, _ms(self.clock()))
                return replay
        if claim.outcome in (CaptureOutcome.IN_PROGRESS, CaptureOutcome.STALLED):
            raise Unavailable(
                "a capture of this authorization is still being written; retry with the same key"
            )
        if claim.outcome is CaptureOutcome.ALREADY_CAPTURED:
            # Redis has it captured, not under this key as far as it knows: a hold a rebuild put
            # back does not know the key its capture had (its claim was lost with Redis), and
            # keeps the key of a later claim that SQL's capture finished. This key's own answer
            # first, when SQL has it (its request the same, or IDEMPOTENCY_KEY_REUSED).
            replay = await self._answer_to_key(merchant_id, authorization_id, amount_fen, call)
            if replay is not None:
                return replay
        if claim.outcome in CAPTURE_REFUSALS:
            raise PolicyRefusal(claim.outcome, f"authorization {authorization_id}: {claim.outcome}")
        if claim.outcome is CaptureOutcome.CAPTURE_EXCEEDS_APPROVED:
            raise InvalidArgument("amount_fen", f"must be at most {claim.approved_fen} fen")
        funding = claim.funding
        parts = split_capture(funding, claim.amount_fen)
        return await self.to_the_end.run(
            self._write_claimed_capture(
                authorization_id, merchant_id, claim, funding, parts, call, now
            )
        )

    async def _write_claimed_capture(
        self,
        authorization_id: str,
        merchant_id: str,
        claim: CaptureClaim,
        funding: Funding,
        parts: Funding,
        call: Idempotency[AuthorizationView],
        now: datetime,
    ) -> AuthorizationView | bytes:
        """Writes a claimed capture to SQL and finishes its hold by the outcome."""
        claim_token = str(_ms(now))  # when capture_begin claimed the hold: its cs
        try:
            result = await self._write_capture(
                authorization_id,
                merchant_id,
                claim.beneficiary_id,
                Purpose(claim.purpose),
                claim.approved_fen,
                funding,
                parts,
                call,
                now,
                created_at=_from_ms(claim.created_ms),
                expires_at=_from_ms(claim.expires_ms),
            )
        except CapturedInLedger as captured:
            # SQL has a capture the hold did not know of (an earlier attempt whose answer was
            # lost): settle the hold as SQL says, never release money SQL counts as captured.
            await self._finish_captured(authorization_id, claim_token, captured.parts, funding)
            raise
        except PolicyRefusal as refusal:
            # A relationship was dissolved, or the ledger cannot pay: the hold is void, and a
            # retry of this capture is told why.
            await self.holds.capture_finish(
                authorization_id, claim_token, Finish.VOIDED, "", refusal.reason
            )
            voided_at = self.clock()
            await self.database.run(
                lambda session: mark_voided(session, authorization_id, voided_at)
            )
            if isinstance(refusal, LedgerLimitExceeded):
                await self._heal_overstated_quota(refusal)
            raise
        except BaseException as failure:
            if isinstance(failure, DomainError) and not isinstance(failure, Unavailable):
                # refused in SQL before anything was written (a reused key): as it was
                await self.holds.capture_finish(authorization_id, claim_token, Finish.PENDING, "")
                raise
            # A lock, a lost connection, a failed batch: SQL may have the capture even so (a
            # COMMIT whose reply was lost). The hold is settled as SQL says; if SQL cannot say,
            # it stays CAPTURING (neither void nor expiry takes it) for the sweeper.
            settled = await self._settle_as_sql_says(
                authorization_id, claim_token, parts, Finish.PENDING, call
            )
            if settled is not None and settled[1] is not None:
                return settled[1]  # SQL has it: its first answer
            raise
        await self._finish_captured(authorization_id, claim_token, format_funding(parts), funding)
        return result

    async def _heal_overstated_quota(self, refusal: LedgerLimitExceeded) -> None:
        """The ledger refused a capture Redis approved: Redis overstated the quota (the void
        just gave the hold back to that figure). It is set from the ledger now, so the next
        Authorize decides on what can be paid rather than approving it again. If it cannot
        be now (another capture of it between its phases), reconcile does it later."""
        try:
            await restore_from_ledger(self.database, self.quotas, refusal.relationship_id)
        except Exception:
            log.warning(
                "quota %s overstated in Redis could not be set from the ledger now",
                refusal.relationship_id,
                extra={"relationship_id": refusal.relationship_id},
                exc_info=True,
            )

    async def _settle_as_sql_says(
        self,
        authorization_id: str,
        claim_token: str,
        funding: Funding,
        if_absent: Finish,
        call: Idempotency[AuthorizationView] | None,
        why: str = "",
    ) -> tuple[bool, bytes | None] | None:
        """Finishes the hold of a capture that failed without a refusal as SQL has it: SQL may
        have the capture even so (a COMMIT whose reply was lost), and a hold put back or voided
        would give money SQL counts as spent back to the quota. SQL is read after any capture
        of these quotas still committing has ended (their row locks are taken first).
        Captured: the hold CAPTURED, (True, the call's stored answer). Not there: the hold
        `if_absent` (VOIDED with `why`), (False, None). SQL does not answer: the hold stays
        CAPTURING, which neither void nor expiry takes, for the sweeper to settle as SQL says
        (None)."""
        relationship_ids = [relationship_id for relationship_id, _ in funding]

        def read(session: Session) -> tuple[str | None, bytes | None]:
            captured = captured_as_sql_says(session, authorization_id, relationship_ids)
            answer = None
            if captured is not None and call is not None:
                stored = session.get(IdempotencyRecordRow, (call.scope, call.key))
                if stored is not None and stored.request_digest == call.request_digest:
                    answer = bytes(stored.response)
            return captured, answer

        try:
            captured, answer = await self.database.run(read)
        except Exception:
            log.warning(
                "capture %s: SQL cannot say whether it was written; left to the sweeper",
                authorization_id,
                extra={"authorization_id": authorization_id},
            )
            return None
        if captured is None:
            await self.holds.capture_finish(authorization_id, claim_token, if_absent, "", why)
            return False, None
        await self._finish_captured(authorization_id, claim_token, captured, funding)
        return True, answer

    async def _put_back_if_open(self, merchant_id: str, authorization_id: str) -> bool:
        """Redis does not know an authorization of this merchant that SQL has open (Redis lost
        it, and the rebuild has not put it back): its hold is put back. True when it was."""
        now = self.clock()
        holds = await self.database.run(
            lambda session: open_holds(session, now, authorization_id=authorization_id)
        )
        if not holds or holds[0].merchant_id != merchant_id:
            return False
        await self._keep_hold(holds[0])
        return True

    async def _capture_without_hold(
        self,
        merchant_id: str,
        authorization_id: str,
        amount_fen: int,
        call: Idempotency[AuthorizationView],
    ) -> bytes:
        """Redis knows no such authorization of this merchant. If SQL does (Redis lost it), a
        retry gets its first answer; otherwise it is captured or, a lost hold, voided."""
        now = self.clock()
        state = await self.database.run(
            lambda session: read_lost_state(session, authorization_id, now)
        )
        if state is None or state[0] != merchant_id:
            raise NotFound(f"authorization {authorization_id} not found")
        replay = await self._answer_to_key(merchant_id, authorization_id, amount_fen, call)
        if replay is not None:
            return replay
        if state[1] is LostState.CAPTURE_MAY_COMMIT:
            raise Unavailable("a capture of this authorization may still be written; retry")
        reason = LOST_REFUSALS[state[1]]
        raise PolicyRefusal(reason, f"authorization {authorization_id}: {reason}")

    async def _answer_to_key(
        self,
        merchant_id: str,
        authorization_id: str,
        amount_fen: int,
        call: Idempotency[AuthorizationView],
    ) -> bytes | None:
        """This key's answer from SQL: its stored record (IDEMPOTENCY_KEY_REUSED for another
        request), or, when SQL has the capture under it but not its record any more (purged
        with its closed month, service/retention.py; the purge drops the record first, then
        Redis's hash), the authorization as it is now, a replay's bytes (not counted as
        captured again). None if neither: no capture, or another key's."""

        def read(session: Session) -> tuple[bytes | None, CaptureRow | None, bool]:
            captured = session.get(CaptureRow, authorization_id)
            # A one-step payment's capture carries its Authorize's key (the journal row's), and
            # its answer is kept under the merchant's Authorize keys (never purged): that
            # capture is not a Capture call's. Both, for this authorization: a till keying both
            # calls of a two-step sale alike has no such record, and one reusing a one-step
            # payment's key for another sale's Capture has another journal row under it.
            journal_row = session.get(AuthorizationRow, authorization_id)
            paid_at_once = (
                captured is not None
                # (no journal row: a one-step payment whose row the journal never got)
                and (journal_row is None or journal_row.idempotency_key == captured.idempotency_key)
                and session.get(
                    IdempotencyRecordRow, (payment_scope(merchant_id), captured.idempotency_key)
                )
                is not None
            )
            return idempotency.find(session, call), captured, paid_at_once

        replay, captured, paid_at_once = await self.database.run(read)
        if replay is not None:
            return replay
        if captured is None or captured.idempotency_key != call.key or paid_at_once:
            return None
        if (amount_fen or captured.approved_fen) != captured.amount_fen:  # 0: all of it
            raise IdempotencyKeyReused(call.key)
        return call.encode(await self.get(merchant_id, authorization_id))

    async def _capture_replay(
        self,
        merchant_id: str,
        authorization_id: str,
        amount_fen: int,
        call: Idempotency[AuthorizationView],
    ) -> bytes:
        """Redis has the hold captured under this key: SQL has the key's answer, or had it
        (purged since: _answer_to_key). Unless the capture SQL has is another key's, which
        finished this key's claim (a hold a rebuild put back, claimed again by this key: its
        write found the capture, CapturedInLedger): this key was refused ALREADY_CAPTURED, and
        is again."""
        replay = await self._answer_to_key(merchant_id, authorization_id, amount_fen, call)
        if replay is None:
            raise PolicyRefusal(
                "ALREADY_CAPTURED", f"authorization {authorization_id}: ALREADY_CAPTURED"
            )
        return replay

    async def _write_capture(
        self,
        authorization_id: str,
        merchant_id: str,
        beneficiary_id: str,
        purpose: Purpose,
        approved_fen: int,
        funding: Funding,
        parts: Funding,
        call: Idempotency[AuthorizationView] | None,
        now: datetime,
        created_at: datetime | None = None,
        expires_at: datetime | None = None,
    ) -> AuthorizationView | bytes:
        merchant = await self.references.merchant(merchant_id)
        unit = CaptureUnit(
            authorization_id=authorization_id,
            merchant_id=merchant_id,
            merchant_region=merchant.pooling_region if merchant else "",
            beneficiary_id=beneficiary_id,
            purpose=purpose,
            approved_fen=approved_fen,
            funding=funding,
            parts=parts,
            call=call,
            now=now,
            created_at=created_at,
            expires_at=expires_at,
        )
        result: AuthorizationView | bytes = await self.captures.submit(unit)
        return result

    # --- Void ------------------------------------------------------------------------------

    async def void(self, merchant_id: str, authorization_id: str) -> AuthorizationView:
        # A cancelled call (its deadline passed) leaves its SQL transaction to commit the void:
        # the hold must then be voided in Redis too, or its money stays held until it expires.
        return await self.to_the_end.run(self._void(merchant_id, authorization_id))

    async def _void(self, merchant_id: str, authorization_id: str) -> AuthorizationView:
        # SQL first (storage/sql/open_holds.void_in_ledger): a capture committing meanwhile
        # either came first (ALREADY_CAPTURED) or is refused; and a rebuild of Redis never puts
        # a voided hold back.
        now = self.clock()
        in_ledger, parts = await self.database.run(
            lambda session: void_in_ledger(session, authorization_id, merchant_id, now)
        )
        if in_ledger is LedgerVoid.CAPTURED:
            # Redis may still hold it (its claim lost with Redis, put back by a rebuild):
            # finished as SQL says, never given back.
            await finish_captured(self.database, self.holds, authorization_id, "", parts)
            raise PolicyRefusal(
                "ALREADY_CAPTURED", f"authorization {authorization_id}: ALREADY_CAPTURED"
            )
        # After SQL's commit: while a rebuild runs (one that read SQL before this void put the
        # hold back), the step waits for it rather than leaving the money held until expiry.
        voided = await when_rebuilt(
            lambda: self.holds.void(authorization_id, merchant_id, _ms(self.clock()))
        )
        outcome = voided.value
        if voided is VoidOutcome.NOT_FOUND:  # unknown, another merchant's, or lost with Redis
            state = await self.database.run(
                lambda session: read_lost_state(session, authorization_id, now)
            )
            if state is None or state[0] != merchant_id:
                raise NotFound(f"authorization {authorization_id} not found")
            if state[1] is LostState.CAPTURE_MAY_COMMIT:
                raise Unavailable("a capture of this authorization may still be written; retry")
            # a void of a hold that counts as voided already: done (as Redis's void says)
            outcome = (
                VoidOutcome.OK.value if state[1] is LostState.VOIDED else LOST_REFUSALS[state[1]]
            )
        if voided is VoidOutcome.CAPTURE_IN_PROGRESS:
            # Its write will find the void and be refused; or, the hold expired (no void mark),
            # a capture claimed before its expiry may still commit: the retry is answered as SQL
            # says then (ALREADY_CAPTURED, or AUTHORIZATION_EXPIRED once none can commit).
            raise Unavailable("a capture of this authorization is being written; retry")
        if outcome != VoidOutcome.OK.value:
            raise PolicyRefusal(outcome, f"authorization {authorization_id}: {outcome}")
        return await self.get(merchant_id, authorization_id)

    # --- Refund ----------------------------------------------------------------------------

    async def refund(
        self,
        merchant_id: str,
        authorization_id: str,
        amount_fen: int,
        call: Idempotency[RefundOutcome],
    ) -> RefundOutcome | bytes:
        """Back to the quota it came from, last-drawn part first (service/refunds.py)."""
        return await self.refunds.refund(merchant_id, authorization_id, amount_fen, call)

    # --- Get -------------------------------------------------------------------------------

    async def get(self, merchant_id: str, authorization_id: str) -> AuthorizationView:
        hold = await self.holds.get(authorization_id)
        if hold is not None and hold.merchant_id != merchant_id:
            raise NotFound(f"authorization {authorization_id} not found")

        def read(session: Session) -> tuple[AuthorizationRow | None, CaptureRow | None, Funding]:
            return (
                session.get(AuthorizationRow, authorization_id),
                session.get(CaptureRow, authorization_id),
                records.captured_parts(session, authorization_id),
            )

        journal_row, capture, drawn = await self.database.run(read)
        captured_at = records.utc(capture.captured_at) if capture else None
        if hold is None:
            if journal_row is None or journal_row.merchant_id != merchant_id:
                raise NotFound(f"authorization {authorization_id} not found")
            # Redis lost it, or retention dropped it once settled: as SQL says
            # (service/lost_authorizations.py).
            status = LOST_STATUSES[lost_state(journal_row, capture is not None, self.clock())]
            return AuthorizationView(
                authorization_id, merchant_id, journal_row.beneficiary_id,
                Purpose(journal_row.purpose), status, journal_row.approved_fen,
                capture.amount_fen if capture else 0, capture.refunded_fen if capture else 0,
                parse_funding(journal_row.funding), records.utc(journal_row.created_at),
                records.utc(journal_row.expires_at) if journal_row.expires_at else None,
                drawn, captured_at,
            )  # fmt: skip
        status = (
            AuthorizationStatus.PENDING
            if hold.status is HoldStatus.CAPTURING
            else AuthorizationStatus(hold.status.value)
        )
        return AuthorizationView(
            authorization_id, merchant_id, hold.beneficiary_id, Purpose(hold.purpose), status,
            hold.approved_fen, capture.amount_fen if capture else 0,
            capture.refunded_fen if capture else 0, hold.funding,
            _from_ms(hold.created_ms), _from_ms(hold.expires_ms), drawn, captured_at,
        )  # fmt: skip


@functools.cache
def _decisions(purpose: Purpose, decision: Decision, reason: DeclineReason | None) -> Any:
    """The decision counter's child for these labels (enums: a bounded cache), looked up once
    rather than by labels() on every call."""
    return metrics.authorizations.labels(
        purpose.value, decision.value, reason.value if reason else "NONE"
    )


@functools.cache
def _approved(purpose: Purpose) -> Any:
    return metrics.approved_fen.labels(purpose.value)


def _count(purpose: Purpose, outcome: AuthorizeOutcome) -> None:
    _decisions(purpose, outcome.decision, outcome.decline_reason).inc()
    if outcome.approved_fen:
        _approved(purpose).inc(outcome.approved_fen)
    if outcome.status is AuthorizationStatus.CAPTURED:
        metrics.captured_fen.labels(purpose.value).inc(outcome.approved_fen)


def _with_status(outcome: AuthorizeOutcome, status: AuthorizationStatus) -> AuthorizeOutcome:
    return AuthorizeOutcome(
        outcome.authorization_id, outcome.decision, outcome.decline_reason, outcome.approved_fen,
        outcome.lines, outcome.funding, outcome.remaining_fen, outcome.expires_at, status,
    )  # fmt: skip


def _declined(outcome: AuthorizeOutcome, reason: DeclineReason) -> AuthorizeOutcome:
    lines = tuple(rules.LineResult(line.item_code, False, reason, 0) for line in outcome.lines)
    return AuthorizeOutcome(
        outcome.authorization_id, Decision.DECLINED, reason, 0, lines, (),
        outcome.remaining_fen + outcome.approved_fen, None, AuthorizationStatus.VOIDED,
    )  # fmt: skip
