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
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy.orm import Session

from authz_server.domain import authorization as rules
from authz_server.domain.errors import (
    IdempotencyKeyReused,
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
from authz_server.service.capture_recovery import (
    finish_captured,
)
from authz_server.service.capture_writer import CapturedInLedger
from authz_server.service.captures import Captures
from authz_server.service.clock import Clock, from_milliseconds, milliseconds, system_clock
from authz_server.service.idempotency import Idempotency
from authz_server.service.journal import (
    DecisionJournal,
    GenerationChanged,
    StoredDecision,
    stored_decision,
)
from authz_server.service.late_journal import LateJournal
from authz_server.service.lost_authorizations import (
    LOST_REFUSALS,
    LOST_STATUSES,
    LostState,
    lost_state,
    read_lost_state,
)
from authz_server.service.ports import (
    NOT_WRITTEN,
    AuthorizeCall,
    Finish,
    HoldDecision,
    HoldStatus,
    HoldStore,
    QuotaCache,
    VoidOutcome,
)
from authz_server.service.quota_sync import when_rebuilt
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
    open_holds,
    void_in_ledger,
)
from authz_server.storage.sql.tables import (
    AuthorizationRow,
    CaptureRow,
)


class Serializable(Protocol):
    """A response message (protobuf), serialized only when the journal writes it."""

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


log = logging.getLogger(__name__)
R = TypeVar("R", bound=Serializable)
T = TypeVar("T")


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


def _whole_milliseconds(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


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
        self.captures = Captures(
            database, holds, quotas, references, self.to_the_end, self._keep_hold, self.get,
            clock,
        )  # fmt: skip
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
            expires_at_ms=milliseconds(now) + hold_seconds * 1000,
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
        try:
            decision = await self._decide(call, milliseconds(now))
        except IdempotencyKeyReused:
            return await self._reused_unless_sql_says(call)
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

    async def _reused_unless_sql_says(self, call: AuthorizeCall) -> bytes:
        """Redis refused the key as used by another request (its merchant-wide claim, or the
        key's record, names another request). SQL's unique (merchant, key) is the last word: a
        claim written after Redis was lost by another request that SQL then refused (undone, but
        its claim stays) must not refuse the request SQL holds the key's decision of; that
        request's retry gets its stored answer (its hold put back if still open)."""
        stored = await self.database.run(
            lambda session: stored_decision(session, call.merchant_id, call.idempotency_key)
        )
        if stored is None or stored.request_digest != call.request_digest:
            raise IdempotencyKeyReused(call.idempotency_key)
        return await self._stored_answer(call, stored, None)

    async def _keep_hold(self, hold: OpenHold) -> None:
        """Makes sure Redis holds an approval SQL has: a rebuild of the hot state that read SQL
        before the decision was committed did not put it back. One round trip that changes
        nothing when Redis knows the authorization; while a rebuild runs, it waits for it (the
        approval is in SQL, so it must be capturable after)."""
        if await when_rebuilt(lambda: self.holds.restore_hold(hold, milliseconds(self.clock()))):
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
            expires_at=from_milliseconds(decision.expires_at_ms) if approved else None,
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
        claim_token = str(milliseconds(now))  # when authorize.lua began the payment's claim: its cs
        answer = respond(_with_status(outcome, AuthorizationStatus.CAPTURED)).SerializeToString()
        paid_once = Idempotency[AuthorizationView](
            payment_scope(request.merchant_id),
            request.idempotency_key,
            call.request_digest,
            lambda _view: answer,
        )
        try:
            written = await self.captures.write(
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
            await self.captures.finish_hold_captured(
                outcome.authorization_id, claim_token, captured.parts, outcome.funding
            )
            return _with_status(outcome, AuthorizationStatus.CAPTURED)
        except LedgerLimitExceeded as refusal:
            # Redis approved what the ledger cannot pay; nothing was paid, so NOT_WRITTEN: a
            # retry with this key decides anew (on the healed figure) instead of a replay.
            await self.holds.capture_finish(
                outcome.authorization_id, claim_token, Finish.VOIDED, "", NOT_WRITTEN
            )
            await self.captures.heal_overstated_quota(refusal)
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
        await self.captures.finish_hold_captured(
            outcome.authorization_id, claim_token, format_funding(outcome.funding), outcome.funding
        )
        return _with_status(outcome, AuthorizationStatus.CAPTURED)

    async def _settle_unfinished_payment(
        self, outcome: AuthorizeOutcome, claim_token: str
    ) -> AuthorizeOutcome | None:
        """A one-step payment whose capture failed without a refusal: settled as SQL says
        (`Captures.settle_as_sql_says`; when SQL has nothing, voided as NOT_WRITTEN, so a retry with
        its key pays anew). CAPTURED when SQL has it; None (the caller raises the failure)
        otherwise."""
        settled = await self.captures.settle_as_sql_says(
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
    ) -> AuthorizationView | bytes:
        """The hold, or part of it, paid (service/captures.py)."""
        return await self.captures.capture(merchant_id, authorization_id, amount_fen, call)

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
            lambda: self.holds.void(authorization_id, merchant_id, milliseconds(self.clock()))
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
            from_milliseconds(hold.created_ms), from_milliseconds(hold.expires_ms), drawn,
            captured_at,
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
