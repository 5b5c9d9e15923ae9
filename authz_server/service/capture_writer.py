"""Captures are written to SQL in batches: one transaction and a few statements per batch.

Concurrent captures queue here; while one batch is in its transaction the next one gathers, so
SQL round trips are shared by every capture waiting (group commit, set-based). Each capture in a
batch is decided on its own (`decide`): a replay gets its stored answer, a reused key, a
dissolved relationship or a quota whose ledger cannot pay (LEDGER_LIMIT_EXCEEDED: Redis
overstated it) refuses that capture only, the others are written. If the batch's
transaction fails for a reason that is not a lock or a lost connection, its captures are retried
one transaction each, so one bad capture cannot fail the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from opentelemetry.trace import SpanContext
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from authz_server.domain import relationships as relationship_rules
from authz_server.domain.errors import (
    IdempotencyKeyReused,
    LedgerLimitExceeded,
    NotFound,
    PolicyRefusal,
    Unavailable,
)
from authz_server.domain.funding import Funding, format_funding
from authz_server.domain.types import AuthorizationStatus, Purpose, RelationshipStatus
from authz_server.observability import metrics, tracing
from authz_server.service.clock import Clock, system_clock
from authz_server.service.idempotency import Idempotency
from authz_server.service.ports import CAPTURE_WRITE_DEADLINE_SECONDS
from authz_server.service.views import AuthorizationView
from authz_server.storage.sql import capture_batch, settlement_lock
from authz_server.storage.sql.capture_batch import AcceptedCapture, BatchState, CapturePart
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.failures import unavailable
from authz_server.storage.sql.group_commit import answer

log = logging.getLogger(__name__)
# Bounds one transaction: enough to share its round trips, short enough for row-lock times.
MAX_BATCH = 256

BatchObserver = Callable[[int, float], None]


@dataclass(frozen=True)
class CaptureUnit:
    authorization_id: str
    merchant_id: str
    merchant_region: str
    beneficiary_id: str
    purpose: Purpose
    approved_fen: int
    funding: Funding
    # what this capture draws, part by part in funding order (zero parts are not written)
    parts: Funding
    call: Idempotency[AuthorizationView] | None
    now: datetime
    created_at: datetime | None
    expires_at: datetime | None


class CapturedInLedger(PolicyRefusal):
    """ALREADY_CAPTURED, found in SQL; carries the captured parts ("rid=fen;...")."""

    def __init__(self, authorization_id: str, parts: str) -> None:
        super().__init__("ALREADY_CAPTURED", f"authorization {authorization_id} is captured")
        self.parts = parts


Outcome = tuple[bool, Any]  # (True, answer) or (False, the exception to raise)


def decide(
    units: list[CaptureUnit], state: BatchState, now: datetime
) -> tuple[list[Outcome], list[AcceptedCapture]]:
    """Each capture's outcome, in order, and the captures to write (`now`: the time the batch
    read `state` under its locks). No I/O."""
    outcomes: list[Outcome] = []
    accepted: list[AcceptedCapture] = []
    keys_in_batch: set[tuple[str, str]] = set()
    captured_in_batch: dict[str, str] = {}
    # relationship id -> fen the captures accepted so far in this batch draw from it
    drawn_in_batch: dict[str, int] = {}
    oldest_claim = now - timedelta(seconds=CAPTURE_WRITE_DEADLINE_SECONDS)
    for unit in units:
        if unit.now < oldest_claim:
            outcomes.append((False, Unavailable("the capture waited too long to be written")))
            continue
        call = unit.call
        if call is not None:
            stored = state.answers.get((call.scope, call.key))
            journaled = state.journaled.get((call.scope, call.key))
            if stored is None and journaled and journaled.authorization_id != unit.authorization_id:
                # A one-step payment whose key the journal holds under another decision that
                # paid nothing (Redis lost the key's record, and decided anew): that decision
                # is the key's, and nothing is paid (or the key was reused: refused).
                stored = journaled.answer
            if stored is not None:
                if stored.request_digest != call.request_digest:
                    outcomes.append((False, IdempotencyKeyReused(call.key)))
                else:
                    outcomes.append((True, stored.response))
                continue
            if (call.scope, call.key) in keys_in_batch:
                # Two captures with one key in one batch: the first decides; the other retries
                # and then gets the first's answer (or is refused as a reused key).
                outcomes.append((False, Unavailable("a capture with this key is being written")))
                continue
        authorization_id = unit.authorization_id
        if authorization_id in state.captured:
            parts_text = format_funding(state.captured[authorization_id])
            outcomes.append((False, CapturedInLedger(authorization_id, parts_text)))
            continue
        if authorization_id in captured_in_batch:
            parts_text = captured_in_batch[authorization_id]
            outcomes.append((False, CapturedInLedger(authorization_id, parts_text)))
            continue
        refusal = _refusal(unit, state) or _beyond_ledger(unit, state, drawn_in_batch)
        if refusal is not None:
            outcomes.append((False, refusal))
            continue
        amount = sum(fen for _, fen in unit.parts)
        answer = AuthorizationView(
            authorization_id, unit.merchant_id, unit.beneficiary_id, unit.purpose,
            AuthorizationStatus.CAPTURED, unit.approved_fen, amount, 0, unit.funding,
            unit.created_at, unit.expires_at, tuple(p for p in unit.parts if p[1]), now,
        )  # fmt: skip
        parts = tuple(
            CapturePart(
                relationship_id,
                position,
                state.relationships[relationship_id].holder_id,
                state.relationships[relationship_id].holder_region,
                fen,
            )
            for position, (relationship_id, fen) in enumerate(unit.parts)
            if fen
        )
        accepted.append(
            AcceptedCapture(
                authorization_id=authorization_id,
                merchant_id=unit.merchant_id,
                merchant_region=unit.merchant_region,
                beneficiary_id=unit.beneficiary_id,
                purpose=unit.purpose.value,
                approved_fen=unit.approved_fen,
                amount_fen=amount,
                idempotency_key=call.key if call else "",
                # The batch's time, read inside its transaction: the month it settles in
                # (storage/sql/settlement_lock.py), not the claim's, which may be in a month
                # closed meanwhile.
                captured_at=now,
                parts=parts,
                answer=(call.scope, call.key, call.request_digest, call.encode(answer))
                if call
                else None,
            )
        )
        if call is not None:
            keys_in_batch.add((call.scope, call.key))
        for part in parts:
            drawn_in_batch[part.relationship_id] = (
                drawn_in_batch.get(part.relationship_id, 0) + part.amount_fen
            )
        captured_in_batch[authorization_id] = format_funding(
            (part.relationship_id, part.amount_fen) for part in parts
        )
        outcomes.append((True, answer))
    return outcomes, accepted


def _refusal(unit: CaptureUnit, state: BatchState) -> Exception | None:
    """A capture draws only from active relationships (a dissolved one voided its holds), and
    never of an authorization a Void marked in SQL first. Every relationship of the hold's
    funding counts, also one the capture takes nothing from: the dissolution voided the whole
    hold (Redis may not have yet: a hold a rebuild put back waits for its settlement there,
    lua/quota_dissolve.lua)."""
    if unit.authorization_id in state.voided:
        return PolicyRefusal("ALREADY_VOIDED", f"authorization {unit.authorization_id} is voided")
    for relationship_id, _ in unit.parts:
        found = state.relationships.get(relationship_id)
        if found is None:
            return NotFound(f"relationship {relationship_id} not found")
        if found.status != RelationshipStatus.ACTIVE.value:
            return PolicyRefusal(
                "RELATIONSHIP_NOT_ACTIVE", f"relationship {relationship_id} is dissolved"
            )
    return None


def _beyond_ledger(
    unit: CaptureUnit, state: BatchState, drawn_in_batch: dict[str, int]
) -> LedgerLimitExceeded | None:
    """The ledger's limit: a capture draws no more from a quota than the ledger has unused,
    counting what the captures accepted before it in this batch draw (not yet written). Redis
    approved the hold; if the ledger cannot pay it, Redis overstated the quota."""
    asked: dict[str, int] = {}
    for relationship_id, fen in unit.parts:
        asked[relationship_id] = asked.get(relationship_id, 0) + fen
    for relationship_id, fen in asked.items():
        if fen == 0:
            continue
        totals = state.relationships[relationship_id].totals
        drawn_fen = drawn_in_batch.get(relationship_id, 0)
        with_batch = replace(totals, captured_total_fen=totals.captured_total_fen + drawn_fen)
        try:
            relationship_rules.check_ledger_pays(relationship_id, with_batch, fen)
        except LedgerLimitExceeded as refusal:
            return refusal
    return None


def _count_ledger_refusals(units: list[CaptureUnit], outcomes: list[Outcome]) -> None:
    """Each refusal by the ledger's limit is counted and logged: Redis overstated a quota
    (an alert pages on any, deploy/RUNBOOK.md#medwalletledgerlimitexceeded)."""
    for unit, (written, result) in zip(units, outcomes, strict=True):
        if not written and isinstance(result, LedgerLimitExceeded):
            metrics.ledger_limit_refusals.labels("capture").inc()
            log.error(
                "capture refused by the ledger: %s (Redis overstated this quota)",
                result.message,
                extra={
                    "relationship_id": result.relationship_id,
                    "authorization_id": unit.authorization_id,
                    "merchant_id": unit.merchant_id,
                },
            )


class CaptureWriter:
    def __init__(
        self,
        database: Database,
        observe: BatchObserver | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.database = database
        self.observe = observe
        self.clock = clock
        self.pending: list[tuple[CaptureUnit, asyncio.Future[Any]]] = []
        self.drain: asyncio.Task[None] | None = None
        self.callers: dict[asyncio.Future[Any], SpanContext] = {}  # traced: the batch links

    async def submit(self, unit: CaptureUnit) -> Any:
        """Writes the capture in the next batch; returns its answer (or the stored answer's
        bytes on a replay), raises its refusal, or Unavailable."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append((unit, future))
        tracing.remember_caller(self.callers, future)
        if self.drain is None or self.drain.done():
            # No long-lived task: a drain runs while captures wait and ends when none do.
            self.drain = asyncio.get_running_loop().create_task(self._drain(), name="captures")
        return await future

    async def written(self) -> None:
        """Returns once the captures queued or in a transaction now are written (shutdown)."""
        drain = self.drain
        if drain is not None and not drain.done():
            await asyncio.wait([drain])

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            units = [unit for unit, _ in batch]
            started = time.perf_counter()
            callers = tracing.callers_of(self.callers, [future for _, future in batch])
            try:
                with tracing.batch_span("sql capture batch", callers, len(batch)):
                    outcomes = await loop.run_in_executor(
                        self.database.executor, self._commit, units
                    )
            except OperationalError as error:  # a lock or a lost connection: retryable
                failure = unavailable(error)
                outcomes = [(False, failure)] * len(batch)
            except Exception:  # not a lock: find the capture that broke it, one by one
                log.exception("capture batch of %d failed; retrying one by one", len(batch))
                outcomes = await loop.run_in_executor(
                    self.database.executor, self._commit_each, units
                )
            if self.observe is not None:
                self.observe(len(batch), time.perf_counter() - started)
            _count_ledger_refusals(units, outcomes)
            answer([future for _, future in batch], outcomes)

    def _commit(self, units: list[CaptureUnit]) -> list[Outcome]:
        return self.database.core_transaction(partial(self._decide_and_write, units))

    def _decide_and_write(self, units: list[CaptureUnit], connection: Connection) -> list[Outcome]:
        settlement_lock.for_writing(connection)  # before the time is read (decide's now)
        state = capture_batch.load(
            connection,
            keys=[(unit.call.scope, unit.call.key) for unit in units if unit.call],
            authorization_ids=[unit.authorization_id for unit in units],
            relationship_ids=[rid for unit in units for rid, _ in unit.parts],
        )
        outcomes, accepted = decide(units, state, self.clock())
        capture_batch.write(connection, accepted)
        return outcomes

    def _commit_each(self, units: list[CaptureUnit]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for unit in units:
            try:
                outcomes.extend(self._commit([unit]))
            except OperationalError as error:
                outcomes.append((False, unavailable(error)))
            except Exception as error:  # this capture only; its transaction was rolled back
                outcomes.append((False, error))
        return outcomes
