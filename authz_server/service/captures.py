"""Capture: the second phase of a two-phase payment (TigerBeetle's post_pending_transfer).

A capture claims its hold in Redis (capture_begin.lua: CAPTURING, which neither void nor expiry
takes), writes the capture to SQL in a set-based batch with the others of its moment
(service/capture_writer.py: the ledger guards each quota's limit there), then finishes the hold
(capture_finish.lua) by what SQL did. Whatever happens in between (a lost reply, a dead process,
a Redis rebuilt from SQL), the hold ends as SQL says: captured_as_sql_says reads SQL after every
capture of its quotas still committing has ended, and the sweeper settles a claim left stalled
(service/capture_recovery.py). A retry with its key gets the first answer (service/
idempotency.py), also once Redis has lost the hold. A one-step payment (Authorize that captures
at once: AuthorizationService) writes and finishes its capture through the same steps.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy.orm import Session

from authz_server.domain.errors import (
    DomainError,
    IdempotencyKeyReused,
    InvalidArgument,
    LedgerLimitExceeded,
    NotFound,
    PolicyRefusal,
    Unavailable,
)
from authz_server.domain.funding import Funding, format_funding
from authz_server.domain.hot_state import OpenHold
from authz_server.domain.types import Purpose
from authz_server.observability import metrics
from authz_server.service import idempotency
from authz_server.service.capture_recovery import (
    captured_as_sql_says,
    finish_captured,
    settle_capture,
)
from authz_server.service.capture_writer import CapturedInLedger, CaptureUnit, CaptureWriter
from authz_server.service.clock import Clock, from_milliseconds, milliseconds
from authz_server.service.idempotency import Idempotency
from authz_server.service.lost_authorizations import LOST_REFUSALS, LostState, read_lost_state
from authz_server.service.ports import (
    CaptureClaim,
    CaptureOutcome,
    Finish,
    FinishReply,
    HoldStore,
    QuotaCache,
)
from authz_server.service.quota_sync import restore_from_ledger, when_rebuilt
from authz_server.service.reference_cache import ReferenceCache
from authz_server.service.to_the_end import ToTheEnd
from authz_server.service.views import AuthorizationView
from authz_server.storage.sql.capture_batch import payment_scope
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.open_holds import mark_voided, open_holds
from authz_server.storage.sql.tables import AuthorizationRow, CaptureRow, IdempotencyRecordRow

log = logging.getLogger(__name__)
# What a claim's outcome is refused with as it is (PolicyRefusal: a normal answer with its
# reason, not an error).
CAPTURE_REFUSALS = frozenset(
    {CaptureOutcome.ALREADY_CAPTURED, CaptureOutcome.ALREADY_VOIDED,
     CaptureOutcome.AUTHORIZATION_EXPIRED, CaptureOutcome.AUTHORIZATION_DECLINED,
     CaptureOutcome.RELATIONSHIP_NOT_ACTIVE, CaptureOutcome.LEDGER_LIMIT_EXCEEDED}
)  # fmt: skip


def split_capture(funding: Funding, amount_fen: int) -> Funding:
    """A capture of less than approved is drawn from the funding parts in order."""
    left, parts = amount_fen, []
    for relationship_id, approved in funding:
        take = min(left, approved)
        left -= take
        parts.append((relationship_id, take))
    return tuple(parts)


class Captures:
    def __init__(
        self,
        database: Database,
        holds: HoldStore,
        quotas: QuotaCache,
        references: ReferenceCache,
        to_the_end: ToTheEnd,
        keep_hold: Callable[[OpenHold], Awaitable[None]],
        get: Callable[[str, str], Awaitable[AuthorizationView]],
        clock: Clock,
    ) -> None:
        self.database = database
        self.holds = holds
        self.quotas = quotas
        self.references = references
        # Shared with AuthorizationService: a capture runs to its end like the rest.
        self.to_the_end = to_the_end
        # AuthorizationService's: puts back a hold SQL has open and Redis lost.
        self.keep_hold = keep_hold
        self.get = get  # GetAuthorization: a retry's answer once its record was purged
        self.clock = clock
        # The set-based batches of captures to SQL (one transaction for the captures of a
        # moment).
        self.writer = CaptureWriter(database, metrics.BatchObserver("captures"), clock)

    async def capture(
        self,
        merchant_id: str,
        authorization_id: str,
        amount_fen: int,
        call: Idempotency[AuthorizationView],
        resumed: bool = False,
        put_back: bool = False,
    ) -> AuthorizationView | bytes:
        """Captures `amount_fen` (0: all) of the hold, once per key: its answer, or the bytes
        SQL stored for the key before. `resumed`: this call settled a stalled claim already
        (not again); `put_back`: it put back the hold Redis had lost (not again)."""
        now = self.clock()
        claim = await self.holds.capture_begin(
            authorization_id, merchant_id, call.key, amount_fen, milliseconds(now)
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
            await settle_capture(
                self.database, self.holds, authorization_id, milliseconds(self.clock())
            )
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
                await settle_capture(
                    self.database, self.holds, authorization_id, milliseconds(self.clock())
                )
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
        claim_token = str(milliseconds(now))  # when capture_begin claimed the hold: its cs
        try:
            result = await self.write(
                authorization_id,
                merchant_id,
                claim.beneficiary_id,
                Purpose(claim.purpose),
                claim.approved_fen,
                funding,
                parts,
                call,
                now,
                created_at=from_milliseconds(claim.created_ms),
                expires_at=from_milliseconds(claim.expires_ms),
            )
        except CapturedInLedger as captured:
            # SQL has a capture the hold did not know of (an earlier attempt whose answer was
            # lost): settle the hold as SQL says, never release money SQL counts as captured.
            await self.finish_hold_captured(authorization_id, claim_token, captured.parts, funding)
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
                await self.heal_overstated_quota(refusal)
            raise
        except BaseException as failure:
            if isinstance(failure, DomainError) and not isinstance(failure, Unavailable):
                # refused in SQL before anything was written (a reused key): as it was
                await self.holds.capture_finish(authorization_id, claim_token, Finish.PENDING, "")
                raise
            # A lock, a lost connection, a failed batch: SQL may have the capture even so (a
            # COMMIT whose reply was lost). The hold is settled as SQL says; if SQL cannot say,
            # it stays CAPTURING (neither void nor expiry takes it) for the sweeper.
            settled = await self.settle_as_sql_says(
                authorization_id, claim_token, parts, Finish.PENDING, call
            )
            if settled is not None and settled[1] is not None:
                return settled[1]  # SQL has it: its first answer
            raise
        await self.finish_hold_captured(
            authorization_id, claim_token, format_funding(parts), funding
        )
        return result

    async def heal_overstated_quota(self, refusal: LedgerLimitExceeded) -> None:
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

    async def settle_as_sql_says(
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
        await self.finish_hold_captured(authorization_id, claim_token, captured, funding)
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
        await self.keep_hold(holds[0])
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

    async def write(
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
        result: AuthorizationView | bytes = await self.writer.submit(unit)
        return result

    async def finish_hold_captured(
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
