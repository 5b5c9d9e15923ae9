"""RegistryService: participants, personal accounts, insurance events, merchants, catalog."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from authz_server.domain import relationships as rules
from authz_server.domain.errors import InvalidArgument, PolicyRefusal, Unavailable
from authz_server.domain.model import CatalogItem, Merchant, Participant
from authz_server.domain.types import (
    InsuranceEventType,
    LedgerKind,
    ParticipantStatus,
    RelationshipStatus,
    Scheme,
    TerminationReason,
)
from authz_server.service import idempotency, ledger
from authz_server.service.clock import Clock, system_clock
from authz_server.service.idempotency import Idempotency
from authz_server.service.ports import QuotaCache
from authz_server.service.quota_sync import when_rebuilt
from authz_server.service.reference_cache import ReferenceCache
from authz_server.service.to_the_end import ToTheEnd
from authz_server.storage.sql import records
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import (
    CatalogItemRow,
    MerchantRow,
    ParticipantRow,
    RelationshipRow,
)

MAX_CATALOG_BATCH = 1000
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CreditResult:
    balance_fen: int
    ledger_entry_id: int


@dataclass(frozen=True)
class InsuranceEventResult:
    participant: Participant
    dissolved_relationship_ids: list[str]
    returned_fen: int


@dataclass(frozen=True)
class InsuranceEvent:
    participant_id: str
    event_type: InsuranceEventType
    termination_reason: TerminationReason | None
    new_pooling_region: str | None
    new_scheme: Scheme | None


class RegistryService:
    def __init__(
        self,
        database: Database,
        quotas: QuotaCache,
        clock: Clock = system_clock,
        references: ReferenceCache | None = None,
    ) -> None:
        self.database = database
        self.quotas = quotas
        self.clock = clock
        self.references = references
        self.to_the_end = ToTheEnd("insurance event")

    async def upsert_participant(
        self, participant_id: str, scheme: Scheme, pooling_region: str
    ) -> tuple[Participant, bool]:
        def work(session: Session) -> tuple[Participant, bool]:
            row = session.get(ParticipantRow, participant_id)
            if row is not None:
                if row.scheme != scheme.value or row.pooling_region != pooling_region:
                    raise PolicyRefusal(
                        "CHANGE_REQUIRES_INSURANCE_EVENT",
                        "a participant's scheme or region changes through ReportInsuranceEvent",
                    )
                return records.participant(row), False
            now = self.clock()
            row = ParticipantRow(
                participant_id=participant_id,
                scheme=scheme.value,
                pooling_region=pooling_region,
                status=ParticipantStatus.ACTIVE.value,
                balance_fen=0,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            return records.participant(row), True

        try:
            return await self.database.run(work)
        except IntegrityError:  # created concurrently by an identical call
            return await self.database.run(work)

    async def get_participant(self, participant_id: str) -> Participant:
        return await self.database.run(
            lambda session: records.participant(records.participant_row(session, participant_id))
        )

    async def credit_account(
        self, participant_id: str, amount_fen: int, call: Idempotency[CreditResult]
    ) -> CreditResult | bytes:
        def work(session: Session) -> CreditResult | bytes:
            replay = idempotency.find(session, call)
            if replay is not None:
                return replay
            row = records.participant_row(session, participant_id, lock=True)
            if row.scheme != Scheme.EMPLOYEE.value:
                raise PolicyRefusal(
                    "NO_PERSONAL_ACCOUNT", f"{participant_id} is not in the employee scheme"
                )
            now = self.clock()
            row.balance_fen += amount_fen
            entry = ledger.entry(
                session, LedgerKind.ACCOUNT_CREDIT, participant_id, amount_fen, now
            )
            session.flush()
            result = CreditResult(balance_fen=row.balance_fen, ledger_entry_id=entry.entry_id)
            idempotency.remember(session, call, result, now)
            return result

        try:
            return await self.database.run(work)
        except IntegrityError:  # the same key committed concurrently: answer as it did
            return await self.database.run(work)

    async def report_event(self, event: InsuranceEvent) -> InsuranceEventResult:
        """Rule 7: ending or moving a person's insurance dissolves all their relationships in one
        transaction, unused quota going back to each holder. Repeating an event changes
        nothing in SQL; it dissolves the person's dissolved quotas in Redis again, in case the
        first call's Redis step did not happen (its process died, or Redis did not answer)."""

        def open_relationships(session: Session) -> list[RelationshipRow]:
            return list(
                session.scalars(
                    records.locked(
                        select(RelationshipRow)
                        .where(
                            or_(
                                RelationshipRow.holder_id == event.participant_id,
                                RelationshipRow.beneficiary_id == event.participant_id,
                            ),
                            RelationshipRow.status.in_([s.value for s in rules.OPEN_STATUSES]),
                        )
                        .order_by(RelationshipRow.relationship_id)
                    )
                )
            )

        def work(session: Session) -> tuple[InsuranceEventResult, list[RelationshipRow]]:
            # Lock order everywhere: relationships first, then participants (allocate, release,
            # dissolve and capture do the same), so concurrent writers cannot deadlock.
            first = open_relationships(session)
            # The person and every holder the dissolutions will credit (ledger.dissolve: an
            # UPDATE of the holder's account), locked together in id order as a proposal and a
            # consent lock people: credited one by one in relationship id order, two events on
            # relatives of the same two holders took their rows in opposite orders and
            # deadlocked (tests/test_insurance_event_lock_order.py).
            people = sorted({event.participant_id} | {r.holder_id for r in first})
            locked = {
                participant_id: records.participant_row(session, participant_id, lock=True)
                for participant_id in people
            }
            row = locked[event.participant_id]
            # Read again under the person's lock: on PostgreSQL the first statement saw only
            # the relationships of its snapshot, and one proposed, consented or funded while it
            # waited for a row would survive the event (a dead holder's quota still spent).
            # Proposing and consenting lock the person's row too, so none is made after this.
            open_rows = open_relationships(session)
            for holder_id in sorted({r.holder_id for r in open_rows} - locked.keys()):
                records.participant_row(session, holder_id, lock=True)  # one made meanwhile
            now = self.clock()
            changed = self._apply(row, event)
            dissolved: list[RelationshipRow] = []
            returned = 0
            if changed and event.event_type is not InsuranceEventType.REINSTATED:
                for relationship in open_rows:
                    reason = rules.dissolution_reason(
                        event.event_type, records.relationship(relationship), row.participant_id
                    )
                    assert reason is not None
                    returned += ledger.dissolve(session, relationship, reason, now, None)
                    dissolved.append(relationship)
            in_redis = dissolved
            if changed:
                row.updated_at = now
            else:  # a repeat: the Redis step of the first call is done again (idempotent)
                in_redis = list(
                    session.scalars(
                        select(RelationshipRow).where(
                            or_(
                                RelationshipRow.holder_id == event.participant_id,
                                RelationshipRow.beneficiary_id == event.participant_id,
                            ),
                            RelationshipRow.status == RelationshipStatus.DISSOLVED.value,
                        )
                    )
                )
            session.flush()
            result = InsuranceEventResult(
                participant=records.participant(row),
                dissolved_relationship_ids=[r.relationship_id for r in dissolved],
                returned_fen=returned,
            )
            return result, in_redis

        async def to_the_end() -> InsuranceEventResult:
            # A cancelled call (its deadline passed) leaves its SQL transaction to commit: its
            # quotas must then be dissolved in Redis too, or Authorize approves on them.
            try:
                result, in_redis = await self.database.run(work)
            except Unavailable:
                # A lost connection: its COMMIT may have gone through. What SQL has dissolved
                # is dissolved in Redis too before the caller hears UNAVAILABLE, not left active
                # there (Authorize approving on money given back to the holders) until the
                # caller repeats the event or the rolling reconcile's dissolutions cursor comes
                # by, minutes later.
                await self._dissolve_as_sql_says(event.participant_id)
                raise
            await self._dissolve_in_redis([(r.beneficiary_id, r.relationship_id) for r in in_redis])
            return result

        return await self.to_the_end.run(to_the_end())

    async def _dissolve_in_redis(self, quotas: Sequence[tuple[str, str]]) -> None:
        """The Redis step of dissolutions SQL committed, (beneficiary, relationship) each, every
        one tried even when an earlier one failed (its reply lost to a timeout: the quotas after
        it were left active in Redis); the first failure is raised once all were tried."""
        failure: Exception | None = None
        for beneficiary_id, relationship_id in quotas:
            dissolve = functools.partial(self.quotas.dissolve, beneficiary_id, relationship_id)
            try:
                # Waits out a rebuild of the hot state (service/quota_sync.py, when_rebuilt);
                # once one has failed, the rest are tried once each (a rebuild that outlasted
                # the wait: not REBUILD_WAIT_SECONDS a quota more; the cursor mends them).
                await (dissolve() if failure is not None else when_rebuilt(dissolve))
            except Exception as error:
                log.warning(
                    "insurance event: quota %s not dissolved in Redis now; the rolling "
                    "reconcile's dissolutions cursor makes sure of it",
                    relationship_id,
                    extra={"relationship_id": relationship_id},
                    exc_info=True,
                )
                failure = failure or error
        if failure is not None:
            raise failure

    async def _dissolve_as_sql_says(self, participant_id: str) -> None:
        """An event whose transaction failed without a refusal: the Redis step of every
        dissolution SQL has for the person (as a repeat of the event does), read under the
        person's row lock (the event's commit, in flight, ends first). SQL cannot say: left to
        the caller's repeat and the rolling reconcile's dissolutions cursor."""

        def read(session: Session) -> list[tuple[str, str]]:
            records.participant_row(session, participant_id, lock=True)
            return [
                (beneficiary_id, relationship_id)
                for beneficiary_id, relationship_id in session.execute(
                    select(RelationshipRow.beneficiary_id, RelationshipRow.relationship_id)
                    .where(
                        or_(
                            RelationshipRow.holder_id == participant_id,
                            RelationshipRow.beneficiary_id == participant_id,
                        ),
                        RelationshipRow.status == RelationshipStatus.DISSOLVED.value,
                    )
                    .order_by(RelationshipRow.relationship_id)
                )
            ]

        try:
            await self._dissolve_in_redis(await self.database.run(read))
        except Exception:
            log.warning(
                "insurance event for %s: SQL or Redis cannot say now whether its dissolutions "
                "were written; the rolling reconcile's dissolutions cursor makes sure of them",
                participant_id,
                exc_info=True,
            )

    @staticmethod
    def _apply(row: ParticipantRow, event: InsuranceEvent) -> bool:
        """Changes the participant; False when the event changes nothing (a repeat)."""
        if event.event_type is InsuranceEventType.TERMINATED:
            if row.status == ParticipantStatus.TERMINATED.value:
                return False
            assert event.termination_reason is not None
            row.status = ParticipantStatus.TERMINATED.value
            row.termination_reason = event.termination_reason.value
            return True
        if event.event_type is InsuranceEventType.TRANSFERRED:
            assert event.new_pooling_region is not None
            if row.pooling_region == event.new_pooling_region:
                return False
            if row.status != ParticipantStatus.ACTIVE.value:
                raise PolicyRefusal(
                    "PARTICIPANT_NOT_ACTIVE", f"{row.participant_id} is not active to transfer"
                )
            row.pooling_region = event.new_pooling_region
            return True
        # REINSTATED: active again, possibly in another scheme or region.
        changed = row.status != ParticipantStatus.ACTIVE.value
        if event.new_scheme is not None and event.new_scheme.value != row.scheme:
            if row.status == ParticipantStatus.ACTIVE.value:
                raise InvalidArgument(
                    "new_scheme", "an active participant changes scheme only by being reinstated"
                )
            row.scheme = event.new_scheme.value
        if event.new_pooling_region and event.new_pooling_region != row.pooling_region:
            if row.status == ParticipantStatus.ACTIVE.value:
                raise InvalidArgument(
                    "new_pooling_region", "use TRANSFERRED to move an active person"
                )
            row.pooling_region = event.new_pooling_region
        row.status = ParticipantStatus.ACTIVE.value
        row.termination_reason = None
        return changed

    async def upsert_merchant(self, merchant: Merchant) -> Merchant:
        def work(session: Session) -> Merchant:
            row = session.get(MerchantRow, merchant.merchant_id)
            if row is None:
                row = MerchantRow(merchant_id=merchant.merchant_id)
                session.add(row)
            row.kind = merchant.kind.value
            row.pooling_region = merchant.pooling_region
            row.designated = merchant.designated
            row.name = merchant.name
            row.updated_at = self.clock()
            return merchant

        result = await self.database.run(work)
        if self.references is not None:
            self.references.put_merchant(merchant)
        return result

    async def upsert_catalog_items(self, items: Sequence[CatalogItem]) -> int:
        if len(items) > MAX_CATALOG_BATCH:
            raise InvalidArgument("items", f"at most {MAX_CATALOG_BATCH} items per call")
        now = self.clock()
        values = [
            {
                "item_code": item.item_code,
                "name": item.name,
                "category": item.category.value,
                "eligible": item.eligible,
                "updated_at": now,
            }
            for item in {item.item_code: item for item in items}.values()
        ]

        def work(session: Session) -> int:
            if not values:
                return 0
            insert = postgresql_insert if not self.database.is_sqlite else sqlite_insert
            statement = insert(CatalogItemRow).values(values)
            statement = statement.on_conflict_do_update(
                index_elements=["item_code"],
                set_={
                    column: statement.excluded[column]
                    for column in ("name", "category", "eligible", "updated_at")
                },
            )
            session.execute(statement)
            return len(values)

        count = await self.database.run(work)
        if self.references is not None:
            self.references.put_items(items)
        return count
