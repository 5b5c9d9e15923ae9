"""RelationshipService: propose, consent, allocate, release, dissolve, read.

Order of writes between SQL (the record) and Redis (the hot quota), chosen so that Redis may
understate a quota but never overstate it:
- money into a quota (allocate): SQL commits first, then Redis is credited;
- money out of a quota (release): Redis is debited first (atomically against concurrent holds),
  then SQL commits, both while the relationship's row is locked; if SQL fails, Redis is
  credited back;
- dissolve: SQL first (a capture re-checks the relationship in SQL, so a hold placed in between
  can never be captured), then Redis.
SQL enforces the ledger's limit whatever Redis says (domain.relationships.check_ledger_pays, and
CHECK constraints on the totals): a release Redis allowed but the ledger has not the money for
is refused INSUFFICIENT_QUOTA, and Redis, which overstated the quota, is set from the ledger.
Dissolving returns exactly the unused money and a refund only adds to a quota, so neither can
break the limit; the constraints are their backstop.
A Redis failure after a SQL commit leaves Redis short until `reconcile` restores it from SQL;
a dissolve's lost Redis step (the quota left active there) is found by the rolling reconcile's
dissolutions cursor (runtime/reconcile_dissolved.py).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from authz_server.domain import relationships as rules
from authz_server.domain.errors import (
    IdempotencyKeyReused,
    InvalidArgument,
    LedgerLimitExceeded,
    PolicyRefusal,
    Unavailable,
)
from authz_server.domain.model import QuotaView, Relationship
from authz_server.domain.types import (
    Channel,
    DissolutionReason,
    LedgerKind,
    Party,
    Relation,
    RelationshipStatus,
)
from authz_server.observability import metrics
from authz_server.service import idempotency, ledger
from authz_server.service.clock import Clock, system_clock
from authz_server.service.idempotency import Idempotency
from authz_server.service.ports import Debit, QuotaCache, QuotaFigures
from authz_server.service.quota_sync import (
    credit_as_ledger_says,
    heal_from_ledger,
    on_loop,
    restore_from_ledger,
    when_rebuilt,
)
from authz_server.service.to_the_end import ToTheEnd
from authz_server.storage.sql import records
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import RelationshipRow

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class QuotaMoveResult:
    quota: QuotaView
    holder_balance_fen: int


@dataclass(frozen=True)
class DissolveResult:
    quota: QuotaView
    returned_fen: int


class RelationshipService:
    def __init__(
        self,
        database: Database,
        quotas: QuotaCache,
        allowed_relations: frozenset[Relation],
        clock: Clock = system_clock,
    ) -> None:
        self.database = database
        self.quotas = quotas
        self.allowed_relations = allowed_relations
        self.clock = clock
        # An allocation or release runs to its end even when its call is cancelled (a deadline):
        # its SQL transaction may commit after the cancel, and its Redis step must follow it.
        self.to_the_end = ToTheEnd("quota allocation, release or dissolution")

    async def propose(
        self, holder_id: str, beneficiary_id: str, relation: Relation, channel: Channel
    ) -> QuotaView:
        def work(session: Session) -> Relationship:
            # Both people's rows locked (in id order): an insurance event about either waits for
            # this proposal, or this waits for it and sees the person's new status
            # (registry.report_event reads their relationships again under that lock).
            rows = {
                participant_id: records.participant_row(session, participant_id, lock=True)
                for participant_id in sorted({holder_id, beneficiary_id})
            }
            holder = records.participant(rows[holder_id])
            beneficiary = records.participant(rows[beneficiary_id])
            existing = session.scalars(
                select(RelationshipRow.relationship_id).where(
                    RelationshipRow.holder_id == holder_id,
                    RelationshipRow.beneficiary_id == beneficiary_id,
                    RelationshipRow.status.in_([s.value for s in rules.OPEN_STATUSES]),
                )
            ).first()
            rules.check_proposal(
                holder, beneficiary, relation, self.allowed_relations, existing is not None
            )
            now = self.clock()
            row = RelationshipRow(
                relationship_id=uuid.uuid4().hex,
                holder_id=holder_id,
                beneficiary_id=beneficiary_id,
                relation=relation.value,
                status=RelationshipStatus.PENDING_CONSENT.value,
                holder_consented=False,
                beneficiary_consented=False,
                created_channel=channel.value,
                created_at=now,
                allocated_total_fen=0,
                released_total_fen=0,
                captured_total_fen=0,
                refunded_to_quota_total_fen=0,
            )
            session.add(row)
            session.flush()
            ledger.event(session, row.relationship_id, "PROPOSED", now, channel)
            return records.relationship(row)

        try:
            relationship = await self.database.run(work)
        except IntegrityError:  # the open-pair index caught a concurrent identical proposal
            raise PolicyRefusal(
                "DUPLICATE_RELATIONSHIP", f"{holder_id} already shares with {beneficiary_id}"
            ) from None
        return QuotaView(relationship, 0, 0)

    async def consent(self, relationship_id: str, party: Party, channel: Channel) -> QuotaView:
        """Rule 4. Consenting again (a retry) answers the relationship unchanged."""

        def work(session: Session) -> tuple[Relationship, bool]:
            row = records.relationship_row(session, relationship_id, lock=True)
            already = row.holder_consented if party is Party.HOLDER else row.beneficiary_consented
            if already and row.status != RelationshipStatus.DISSOLVED.value:
                return records.relationship(row), False
            relationship = records.relationship(row)
            # Their rows locked, in id order as a proposal takes them: holder first, a consent
            # and a proposal of the reverse pair (or two consents of it) could deadlock.
            people = {
                participant_id: records.participant_row(session, participant_id, lock=True)
                for participant_id in sorted({row.holder_id, row.beneficiary_id})
            }
            rules.check_consent(
                relationship,
                records.participant(people[row.holder_id]),
                records.participant(people[row.beneficiary_id]),
            )
            now = self.clock()
            if party is Party.HOLDER:
                row.holder_consented = True
            else:
                row.beneficiary_consented = True
            ledger.event(session, relationship_id, "CONSENTED", now, channel, party)
            activated = rules.becomes_active(relationship, party)
            if activated:
                row.status = RelationshipStatus.ACTIVE.value
                row.activated_at = now
                ledger.event(session, relationship_id, "ACTIVATED", now, channel)
            return records.relationship(row), activated

        relationship, activated = await self.database.run(work)
        # Only the activating consent sets the hot quota. A repeated consent must not: its
        # restore could land between a release's Redis debit and its SQL commit and put the
        # released money back into the quota (Redis overstating it; spendable twice).
        if activated:
            await self._restore(relationship.relationship_id)
        return await self._view(relationship)

    async def allocate(
        self,
        relationship_id: str,
        amount_fen: int,
        call: Idempotency[QuotaMoveResult],
        channel: Channel,
    ) -> QuotaMoveResult | bytes:
        """Rule 5: personal account -> quota. SQL first, then Redis (see module docstring)."""
        checked = await self._precheck(relationship_id, call)
        if isinstance(checked, bytes):
            # A retry: its first call's Redis credit may have been lost after its commit (the
            # caller got UNAVAILABLE); the quota is set from the ledger, not left understated
            # (payments declined on money SQL holds) until the rolling reconcile reaches it.
            await heal_from_ledger(self.database, self.quotas, relationship_id)
            return checked
        held_fen = (await self._figures(checked)).held_fen

        entry_ids: list[int] = []  # the allocation's ledger entry, once written

        def work(session: Session) -> tuple[QuotaMoveResult | bytes, Relationship | None]:
            # The row lock first: an identical call in flight holds it until it commits, so the
            # replay is found here instead of the balance it already took being found short.
            row = records.relationship_row(session, relationship_id, lock=True)
            replay = idempotency.find(session, call)
            if replay is not None:
                return replay, None
            # Locked on the first read: a later SELECT ... FOR UPDATE in this session would hand
            # back the identity-mapped row unrefreshed, and the debit would overwrite the balance
            # from a stale read (a lost update under concurrent allocations on PostgreSQL).
            holder_row = records.participant_row(session, row.holder_id, lock=True)
            rules.check_quota_movable(records.relationship(row), records.participant(holder_row))
            holder = ledger.debit_account(session, row.holder_id, amount_fen)
            now = self.clock()
            row.allocated_total_fen += amount_fen
            entry = ledger.entry(
                session,
                LedgerKind.QUOTA_ALLOCATION,
                row.holder_id,
                amount_fen,
                now,
                relationship_id=relationship_id,
                channel=channel,
            )
            session.flush()  # the entry's id: the credit's mark in Redis (quota_credit.lua)
            entry_ids[:] = [entry.entry_id]
            relationship = records.relationship(row)
            unused_fen = relationship.totals.unused_fen
            view = QuotaView.shown(relationship, unused_fen - held_fen, held_fen)
            result = QuotaMoveResult(view, holder.balance_fen)
            idempotency.remember(session, call, result, now)
            return result, relationship

        async def to_the_end() -> QuotaMoveResult | bytes:
            # SQL first, then Redis; to the end even when the call is cancelled meanwhile: a
            # commit whose credit never came would understate the quota until reconcile.
            try:
                result, relationship = await self._run_idempotent(work)
            except Unavailable:
                # A lost connection: its COMMIT may have gone through, its credit then never
                # sent. The quota is set from the ledger (under the row lock: right either
                # way), not left short until the channel's retry or the rolling reconcile.
                await heal_from_ledger(self.database, self.quotas, relationship_id)
                raise
            if relationship is None:  # a retry's replay (see above)
                await heal_from_ledger(self.database, self.quotas, relationship_id)
                return result
            await credit_as_ledger_says(
                self.database,
                self.quotas,
                relationship.beneficiary_id,
                relationship_id,
                amount_fen,
                entry_ids[0],
            )
            return result

        return await self.to_the_end.run(to_the_end())

    async def release(
        self,
        relationship_id: str,
        amount_fen: int,
        call: Idempotency[QuotaMoveResult],
        channel: Channel,
    ) -> QuotaMoveResult | bytes:
        """Rule 5: unused quota -> personal account. Redis first, then SQL, both under the
        relationship's row lock: an identical call in flight holds that lock from before its
        Redis debit until its commit, so a concurrent retry finds its answer, never a quota the
        first call already took (which would refuse a retry of a call that succeeded)."""

        checked = await self._precheck(relationship_id, call)
        if isinstance(checked, bytes):
            return checked
        beneficiary_id = checked.beneficiary_id
        loop = asyncio.get_running_loop()
        debited: list[Debit] = []  # what Redis answered once it gave the money
        # A debit sent: Redis may have taken the money even when its answer never came back
        # (a timeout), and then nothing else would give it back.
        debit_sent: list[bool] = []

        def work(session: Session) -> tuple[QuotaMoveResult | bytes, Relationship | None]:
            row = records.relationship_row(session, relationship_id, lock=True)
            replay = idempotency.find(session, call)
            if replay is not None:
                return replay, None
            holder_row = records.participant_row(session, row.holder_id, lock=True)
            rules.check_quota_movable(records.relationship(row), records.participant(holder_row))
            if not debited:
                debit_sent.append(True)
                taken = on_loop(
                    loop, self.quotas.debit(beneficiary_id, relationship_id, amount_fen)
                )
                if taken is None:
                    raise _QuotaShort
                debited.append(taken)
            # Redis gave the money; the ledger must have it too (under the row lock).
            rules.check_ledger_pays(relationship_id, records.totals(row), amount_fen)
            remaining = debited[0].available_fen
            now = self.clock()
            row.released_total_fen += amount_fen
            holder_row.balance_fen += amount_fen
            ledger.entry(
                session,
                LedgerKind.QUOTA_RELEASE,
                row.holder_id,
                amount_fen,
                now,
                relationship_id=relationship_id,
                channel=channel,
            )
            relationship = records.relationship(row)
            view = QuotaView(relationship, remaining, self._held_after(relationship, remaining))
            result = QuotaMoveResult(view, holder_row.balance_fen)
            idempotency.remember(session, call, result, now)
            return result, relationship

        async def to_the_end() -> QuotaMoveResult | bytes:
            try:
                result, relationship = await self._run_idempotent(work)
            except _QuotaShort:
                raise
            except LedgerLimitExceeded:
                # Redis overstated the quota: its debit is not given back; the quota is set
                # from the ledger instead.
                await heal_from_ledger(self.database, self.quotas, relationship_id)
                raise
            except BaseException:
                if debited:
                    replay = await self._release_as_sql_says(
                        beneficiary_id, relationship_id, amount_fen, debited[0].epoch, call
                    )
                    if replay is not None:
                        return replay  # SQL has it: the first answer
                elif debit_sent:
                    # The debit's answer was lost (a timeout): Redis may have taken the money,
                    # and SQL has not (the transaction ended at the debit, rolled back). Left
                    # so, the quota was understated until the rolling reconcile reached it, and
                    # the retry was debited again (or refused INSUFFICIENT_QUOTA). Set from the
                    # ledger under the row lock: right whether or not the debit ran.
                    await heal_from_ledger(self.database, self.quotas, relationship_id)
                raise
            if relationship is None and debited:  # the key committed concurrently: give back
                await self.quotas.give_back(
                    beneficiary_id, relationship_id, amount_fen, debited[0].epoch
                )
            return result

        try:
            return await self.to_the_end.run(to_the_end())
        except _QuotaShort:
            rules.check_release((await self._figures(checked)).available_fen, amount_fen)
            raise PolicyRefusal("INSUFFICIENT_QUOTA", "the quota changed; try again") from None
        except LedgerLimitExceeded as refusal:
            metrics.ledger_limit_refusals.labels("release").inc()
            log.error(
                "release refused by the ledger: %s (Redis overstated this quota)",
                refusal.message,
                extra={"relationship_id": relationship_id},
            )
            raise PolicyRefusal(
                "INSUFFICIENT_QUOTA",
                f"only {refusal.unused_fen} fen of the quota is unused in the ledger",
            ) from None

    async def _release_as_sql_says(
        self,
        beneficiary_id: str,
        relationship_id: str,
        amount_fen: int,
        epoch: str,
        call: Idempotency[QuotaMoveResult],
    ) -> bytes | None:
        """A release whose transaction failed without a refusal (a lost connection, whose
        COMMIT may have gone through): its Redis debit is given back only when SQL does not
        have it, read under the relationship's row lock (a commit in flight ends first).
        SQL has it: its stored answer, the quota set from the ledger. SQL cannot say: the
        debit stays (Redis understates the quota until reconcile, never overstates it) and
        None, as when it was given back."""

        def read(session: Session) -> bytes | None:
            records.relationship_row(session, relationship_id, lock=True)
            return idempotency.find(session, call)

        try:
            replay = await self.database.run(read)
        except IdempotencyKeyReused:  # another request took the key: this one did not commit
            replay = None
        except Exception:
            log.warning(
                "release on %s: SQL cannot say whether it was written; its Redis debit of %d fen "
                "stays until reconcile",
                relationship_id,
                amount_fen,
            )
            return None
        if replay is None:
            await self.quotas.give_back(beneficiary_id, relationship_id, amount_fen, epoch)
        else:
            # SQL has the key's release: this call's own commit whose reply was lost, or a
            # retry's (this call's deadline passed) that committed after this transaction rolled
            # back, and took a debit of its own: two debits then, one release. The quota is set
            # from the ledger (under the row lock), not left understated until reconcile.
            await heal_from_ledger(self.database, self.quotas, relationship_id)
        return replay

    async def dissolve(
        self, relationship_id: str, party: Party, channel: Channel
    ) -> DissolveResult:
        """Rule 4: either party may dissolve; unused quota goes back to the holder. Dissolving a
        dissolved relationship (a retry) answers it unchanged with returned_fen 0."""

        def work(session: Session) -> tuple[Relationship, int]:
            row = records.relationship_row(session, relationship_id, lock=True)
            if row.status == RelationshipStatus.DISSOLVED.value:
                return records.relationship(row), 0
            returned = ledger.dissolve(
                session, row, DissolutionReason.VOLUNTARY, self.clock(), channel, party
            )
            return records.relationship(row), returned

        async def to_the_end() -> DissolveResult:
            # A cancelled call (its deadline passed) leaves its SQL transaction to commit: the
            # quota must then be dissolved in Redis too, or Authorize approves on it.
            try:
                relationship, returned = await self.database.run(work)
            except Unavailable:
                # A lost connection: its COMMIT may have gone through. Dissolved in SQL, the
                # quota is dissolved in Redis too before the caller hears UNAVAILABLE, not left
                # active there (approving on money given back to the holder) until the rolling
                # reconcile's dissolutions cursor comes by, minutes later.
                await self._dissolve_as_sql_says(relationship_id)
                raise
            await when_rebuilt(
                lambda: self.quotas.dissolve(relationship.beneficiary_id, relationship_id)
            )
            return DissolveResult(QuotaView(relationship, 0, 0), returned)

        return await self.to_the_end.run(to_the_end())

    async def _dissolve_as_sql_says(self, relationship_id: str) -> None:
        """A dissolve whose transaction failed without a refusal: runs its Redis step when SQL,
        read under the row lock (a commit in flight ends first), has the relationship
        dissolved. SQL cannot say: left to the rolling reconcile's dissolutions cursor."""

        def read(session: Session) -> Relationship:
            return records.relationship(
                records.relationship_row(session, relationship_id, lock=True)
            )

        try:
            relationship = await self.database.run(read)
            if relationship.status is RelationshipStatus.DISSOLVED:
                await when_rebuilt(
                    lambda: self.quotas.dissolve(relationship.beneficiary_id, relationship_id)
                )
        except Exception:
            log.warning(
                "dissolve of %s: SQL or Redis cannot say now whether it was written; the "
                "rolling reconcile's dissolutions cursor makes sure of it",
                relationship_id,
                extra={"relationship_id": relationship_id},
                exc_info=True,
            )

    async def get(self, relationship_id: str) -> QuotaView:
        relationship = await self.database.run(
            lambda session: records.relationship(records.relationship_row(session, relationship_id))
        )
        return await self._view(relationship)

    async def list(
        self, holder_id: str | None, beneficiary_id: str | None, page_size: int, page_token: str
    ) -> tuple[list[QuotaView], str]:
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        after = _decode_token(page_token)

        def work(session: Session) -> list[Relationship]:
            query = select(RelationshipRow)
            if holder_id is not None:
                query = query.where(RelationshipRow.holder_id == holder_id)
            else:
                query = query.where(RelationshipRow.beneficiary_id == beneficiary_id)
            if after:
                query = query.where(RelationshipRow.relationship_id > after)
            rows = session.scalars(query.order_by(RelationshipRow.relationship_id).limit(size + 1))
            return [records.relationship(row) for row in rows]

        relationships = await self.database.run(work)
        more = len(relationships) > size
        relationships = relationships[:size]
        views = [await self._view(r) for r in relationships]
        next_token = _encode_token(relationships[-1].relationship_id) if more else ""
        return views, next_token

    async def _run_idempotent(
        self, work: Callable[[Session], tuple[T | bytes, Relationship | None]]
    ) -> tuple[T | bytes, Relationship | None]:
        try:
            return await self.database.run(work)
        except IntegrityError:  # the same key committed concurrently: answer as it did
            return await self.database.run(work)

    async def _view(self, relationship: Relationship) -> QuotaView:
        if relationship.status is not RelationshipStatus.ACTIVE:
            return QuotaView(relationship, 0, 0)
        figures = await self.quotas.figures(
            relationship.beneficiary_id, [relationship.relationship_id]
        )
        found = figures.get(relationship.relationship_id)
        if found is None:
            found = await self._restore(relationship.relationship_id)
        return QuotaView.shown(relationship, found.available_fen, found.held_fen)

    async def _precheck(
        self, relationship_id: str, call: Idempotency[QuotaMoveResult]
    ) -> bytes | Relationship:
        """A replayed answer, or the relationship after the checks of rule 5 (read only)."""

        def check(session: Session) -> bytes | Relationship:
            replay = idempotency.find(session, call)
            if replay is not None:
                return replay
            row = records.relationship_row(session, relationship_id)
            holder = records.participant(records.participant_row(session, row.holder_id))
            relationship = records.relationship(row)
            rules.check_quota_movable(relationship, holder)
            return relationship

        return await self.database.run(check)

    async def _figures(self, relationship: Relationship) -> QuotaFigures:
        return (await self._view(relationship)).figures

    @staticmethod
    def _held_after(relationship: Relationship, available_fen: int) -> int:
        return max(0, relationship.totals.unused_fen - available_fen)

    async def _restore(self, relationship_id: str) -> QuotaFigures:
        """Sets the hot quota from the ledger (also when Redis lacked it: the ledger already
        counts every change)."""
        return await restore_from_ledger(self.database, self.quotas, relationship_id)


class _QuotaShort(Exception):
    """Redis refused a release's debit (not enough available); refused after the lock."""


def _encode_token(relationship_id: str) -> str:
    return base64.urlsafe_b64encode(relationship_id.encode()).decode()


def _decode_token(page_token: str) -> str:
    """Page tokens are opaque to callers; a token we did not issue is INVALID_ARGUMENT."""
    if not page_token:
        return ""
    try:
        return base64.urlsafe_b64decode(page_token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is not a token this service issued") from None
