"""Refund: a captured payment, or part of it, back to where it came from (README "Refunds").

Written to SQL first, in the refunds' group commit (storage/sql/group_commit.py: many refunds
one transaction, each in a savepoint, their quotas locked first in id order:
storage/sql/refund_locks.py), then credited to the quotas in Redis, to its end even when the
call is cancelled meanwhile (service/to_the_end.py). Each part goes back last-drawn first, to
the quota it came from, or to the holder's personal account where that relationship is no
longer active. The key's answer is stored in SQL (service/idempotency.py); a refund whose record
was purged with its closed month is still found through the refunds table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.errors import IdempotencyKeyReused, NotFound, PolicyRefusal, Unavailable
from authz_server.domain.types import AuthorizationStatus, LedgerKind, RelationshipStatus
from authz_server.service import idempotency, ledger
from authz_server.service.clock import Clock
from authz_server.service.idempotency import Idempotency
from authz_server.service.ports import QuotaCache
from authz_server.service.quota_sync import credit_as_ledger_says, heal_from_ledger
from authz_server.service.to_the_end import ToTheEnd
from authz_server.service.views import AuthorizationView
from authz_server.storage.sql import records, settlement_lock
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.group_commit import GroupCommit
from authz_server.storage.sql.refund_locks import lock_quotas_of_refund
from authz_server.storage.sql.tables import CapturePartRow, CaptureRow, RefundRow


@dataclass(frozen=True)
class RefundOutcome:
    view: AuthorizationView
    # (relationship id, fen, went to the personal account because the quota is dissolved)
    parts: tuple[tuple[str, int, bool], ...]


def _capture_parts(session: Session, authorization_id: str) -> list[CapturePartRow]:
    """A capture's parts, last-drawn first (the order refunds go back in), as they are under
    the capture's lock (records.locked: a unit rolled back earlier in a group commit may have
    loaded them)."""
    return list(
        session.scalars(
            select(CapturePartRow)
            .where(CapturePartRow.authorization_id == authorization_id)
            .order_by(CapturePartRow.position.desc())
            .execution_options(populate_existing=True)
        )
    )


def _captured_view(
    base: AuthorizationView, capture: CaptureRow, parts: list[CapturePartRow]
) -> AuthorizationView:
    """The authorization as Get shows it, with its capture's figures as they are now."""
    return replace(
        base, status=AuthorizationStatus.CAPTURED, approved_fen=capture.approved_fen,
        captured_fen=capture.amount_fen, refunded_fen=capture.refunded_fen,
        captured_funding=tuple((p.relationship_id, p.amount_fen) for p in reversed(parts)),
        captured_at=records.utc(capture.captured_at),
    )  # fmt: skip


def _refund_made_under(
    session: Session, authorization_id: str, merchant_id: str, key: str
) -> RefundRow | None:
    """A refund of the authorization made under `key` whose idempotency record is gone: purged
    with its closed month (service/retention.py). The refunds table keeps every refund's key
    for good, found through the authorization's index, so a retry after the purge is still
    answered as a retry (the authorization as it is now; the parts were in the purged record)
    and never refunded again."""
    return session.scalars(
        select(RefundRow).where(
            RefundRow.authorization_id == authorization_id,
            RefundRow.merchant_id == merchant_id,
            RefundRow.idempotency_key == key,
        )
    ).first()


class Refunds:
    """`get`: the authorization as GetAuthorization shows it (AuthorizationService.get), the
    answer's base, so every RPC answers the same view (NotFound for another merchant's id)."""

    def __init__(
        self,
        database: Database,
        quotas: QuotaCache,
        group_commit: GroupCommit,
        to_the_end: ToTheEnd,
        get: Callable[[str, str], Awaitable[AuthorizationView]],
        clock: Clock,
    ) -> None:
        self.database = database
        self.quotas = quotas
        self.group_commit = group_commit
        self.to_the_end = to_the_end
        self.get = get
        self.clock = clock

    async def refund(
        self,
        merchant_id: str,
        authorization_id: str,
        amount_fen: int,
        call: Idempotency[RefundOutcome],
    ) -> RefundOutcome | bytes:
        """Back to the quota it came from, last-drawn part first; to the holder's personal
        account where that relationship is no longer active."""
        # (beneficiary, relationship, fen, the REFUND_TO_QUOTA ledger entry), once written
        credits: list[tuple[str, str, int, int]] = []
        # A retry's relationships, set from the ledger after its replay: its first call's
        # credits may have been lost after its commit (the till got UNAVAILABLE), and the
        # quotas would stay understated until the rolling reconcile reached them.
        to_heal: list[str] = []
        # The authorization as Get shows it (its times, its funding as approved): the answer's
        # base, so every RPC answers the same view (NotFound for another merchant's id).
        base = await self.get(merchant_id, authorization_id)

        def work(session: Session) -> RefundOutcome | bytes:
            credits.clear()
            to_heal.clear()
            # The time is read inside the transaction, after the settlement lock: the month the
            # refund settles in (storage/sql/settlement_lock.py).
            settlement_lock.for_writing(session)
            now = self.clock()
            # Its quotas before its capture row, in id order, as the batch's lock_first takes
            # them (held already, but for a capture committed after lock_first read the parts:
            # locking the capture row first, this unit and another worker's refund of the same
            # capture, whose batch locked the quotas first, took the two in opposite orders and
            # deadlocked on PostgreSQL).
            lock_quotas_of_refund(session, authorization_id)
            # Refreshed from the row it locks (records.locked): a refused refund earlier in this
            # group commit may have loaded it, and its savepoint's rollback let the lock go.
            capture = session.get(
                CaptureRow, authorization_id, with_for_update=True, populate_existing=True
            )
            # The key is looked up after the lock: a retry on another worker while the first
            # call's transaction is open waits for the lock, then finds its answer (before the
            # lock it found none and decided the refund anew: refused, or refunded twice).
            replay = idempotency.find(session, call)
            if replay is not None:
                if capture is not None:
                    to_heal[:] = [
                        p.relationship_id for p in _capture_parts(session, authorization_id)
                    ]
                return replay
            if capture is None or capture.merchant_id != merchant_id:
                raise NotFound(f"no capture of authorization {authorization_id}")
            made = _refund_made_under(session, authorization_id, merchant_id, call.key)
            if made is not None:  # its record was purged with its closed month
                if made.amount_fen != amount_fen:
                    raise IdempotencyKeyReused(call.key)
                parts = _capture_parts(session, authorization_id)
                to_heal[:] = [part.relationship_id for part in parts]
                # a replay's bytes (not an outcome: the handler counts outcomes as refunded)
                return call.encode(RefundOutcome(_captured_view(base, capture, parts), ()))
            if capture.refunded_fen + amount_fen > capture.amount_fen:
                raise PolicyRefusal(
                    "REFUND_EXCEEDS_CAPTURED",
                    f"only {capture.amount_fen - capture.refunded_fen} fen can still be refunded",
                )
            capture_parts = _capture_parts(session, authorization_id)
            left, done = amount_fen, []
            for part in capture_parts:
                take = min(left, part.amount_fen - part.refunded_fen)
                if take <= 0:
                    continue
                left -= take
                part.refunded_fen += take
                # Held already (the batch took its quotas first, in id order: refund_locks.py);
                # locked again for the row as it is now (records.locked).
                row = records.relationship_row(session, part.relationship_id, lock=True)
                row.refunded_to_quota_total_fen += take
                to_account = row.status != RelationshipStatus.ACTIVE.value
                if to_account:  # through the quota straight back to the holder's account
                    row.released_total_fen += take
                    ledger.credit_account(session, row.holder_id, take)
                kind = LedgerKind.REFUND_TO_ACCOUNT if to_account else LedgerKind.REFUND_TO_QUOTA
                entry = ledger.entry(
                    session, kind, row.holder_id, take, now, relationship_id=row.relationship_id
                )
                entry.authorization_id = authorization_id
                entry.merchant_id = merchant_id
                entry.holder_region = part.holder_region
                entry.merchant_region = capture.merchant_region
                if not to_account:
                    session.flush()  # the entry's id: the credit's mark in Redis
                    credits.append((row.beneficiary_id, row.relationship_id, take, entry.entry_id))
                done.append((row.relationship_id, take, to_account))
            capture.refunded_fen += amount_fen
            session.add(
                RefundRow(
                    authorization_id=authorization_id,
                    merchant_id=merchant_id,
                    amount_fen=amount_fen,
                    idempotency_key=call.key,
                    created_at=now,
                )
            )
            outcome = RefundOutcome(_captured_view(base, capture, capture_parts), tuple(done))
            idempotency.remember(session, call, outcome, now)
            return outcome

        try:
            # SQL first, then the credits; to the end even when the call is cancelled meanwhile
            # (a refund whose credit never came would understate the quota until reconcile).
            return await self.to_the_end.run(
                self._refund_to_the_end(authorization_id, work, credits, to_heal)
            )
        except NotFound:
            # This merchant's authorization, not (yet) captured: nothing can be refunded.
            # Another merchant's, or none: get() raises NotFound itself.
            await self.get(merchant_id, authorization_id)
            raise PolicyRefusal(
                "REFUND_EXCEEDS_CAPTURED",
                f"authorization {authorization_id} is not captured: nothing to refund",
            ) from None

    async def _refund_to_the_end(
        self,
        authorization_id: str,
        work: Callable[[Session], RefundOutcome | bytes],
        credits: list[tuple[str, str, int, int]],
        to_heal: list[str],
    ) -> RefundOutcome | bytes:
        # Its quotas locked by the batch before its units run (storage/sql/refund_locks.py).
        try:
            result = await self.group_commit.submit(work, lock_key=authorization_id)
        except Unavailable:
            # A lost connection: the batch's COMMIT may have gone through, its credits then
            # never sent. The quotas the refund credits are set from the ledger (under their
            # row locks: right either way), not left short (payments declined on refunded
            # money) until the till's retry or the rolling reconcile reaches them.
            for relationship_id in sorted({credit[1] for credit in credits}):
                await heal_from_ledger(self.database, self.quotas, relationship_id)
            raise
        for relationship_id in to_heal:
            await heal_from_ledger(self.database, self.quotas, relationship_id)
        failure: Exception | None = None
        for beneficiary_id, relationship_id, fen, entry_id in credits:
            try:
                await credit_as_ledger_says(
                    self.database, self.quotas, beneficiary_id, relationship_id, fen, entry_id
                )
            except Exception as error:
                # The refund's other credits still sent (they were skipped, their quotas short
                # until a retry or the rolling reconcile); the caller hears the first failure.
                failure = failure or error
        if failure is not None:
            raise failure
        return result
