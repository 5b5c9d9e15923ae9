"""Captures written set-based: a few statements per batch of captures, not a dozen per capture.

One batch is one transaction: read what the batch needs in three queries (idempotency records,
captures already written, the funding relationships locked in id order with their holders'
regions), let the caller decide every capture in Python, then write the accepted ones with one
executemany per table; all of it on the DBAPI cursor (storage/sql/dbapi.py). Lock order is the
service's everywhere: relationships (sorted by id, so two batches cannot deadlock each other),
participants only read.

Each accepted capture part writes its CAPTURE ledger row here, beside the capture_parts row and
the relationship's captured_total_fen: the three always change together.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, Dialect, Table

from authz_server.domain.model import QuotaTotals
from authz_server.domain.types import LedgerKind
from authz_server.storage.sql.dbapi import BulkInsert, fetch_all, marker, placeholders, run_many
from authz_server.storage.sql.tables import (
    AuthorizationRow,
    CapturePartRow,
    CaptureRow,
    IdempotencyRecordRow,
    LedgerEntryRow,
    ParticipantRow,
    RelationshipRow,
)

authorizations: Table = AuthorizationRow.__table__  # type: ignore[assignment]
captures: Table = CaptureRow.__table__  # type: ignore[assignment]
capture_parts: Table = CapturePartRow.__table__  # type: ignore[assignment]
ledger_entries: Table = LedgerEntryRow.__table__  # type: ignore[assignment]
idempotency_records: Table = IdempotencyRecordRow.__table__  # type: ignore[assignment]
relationships: Table = RelationshipRow.__table__  # type: ignore[assignment]
participants: Table = ParticipantRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class StoredAnswer:
    request_digest: str
    response: bytes


# The idempotency scope of a one-step payment's answer: its merchant's Authorize keys. The
# journal (authorizations) keeps every Authorize decision under the same (merchant, key).
PAYMENT_SCOPE_PREFIX = "authorize:"


def payment_scope(merchant_id: str) -> str:
    return f"{PAYMENT_SCOPE_PREFIX}{merchant_id}"


@dataclass(frozen=True)
class JournaledDecision:
    """The decision the journal holds for a payment's (merchant, key)."""

    authorization_id: str
    answer: StoredAnswer


@dataclass(frozen=True)
class FundingRelationship:
    status: str
    holder_id: str
    holder_region: str
    # as committed, under the row lock: what the ledger's limit is checked against
    totals: QuotaTotals


@dataclass(frozen=True)
class BatchState:
    """What SQL holds for a batch, read under the relationships' row locks."""

    # (scope, key) -> the answer stored by the first call with that key
    answers: dict[tuple[str, str], StoredAnswer]
    # authorization id -> its captured parts ((relationship id, fen) in position order)
    captured: dict[str, tuple[tuple[str, int], ...]]
    relationships: dict[str, FundingRelationship]
    # authorizations voided in SQL (a Void, a refused capture): never captured after that
    voided: frozenset[str] = frozenset()
    # (payment scope, key) -> the decision the journal holds for a one-step payment's key: one
    # that paid nothing (a decline, a hold) leaves no answer in `answers`, and a payment decided
    # anew after Redis lost the key's record must not be paid over it. Not covered: that first
    # decision's row still queued, not committed, when this batch reads (a journal backlog
    # spanning the Redis loss, its rebuild and the till's retry); inserting the payment's own
    # journal row in this transaction would close it (the unique key deciding).
    journaled: dict[tuple[str, str], JournaledDecision] = field(default_factory=dict)


@dataclass(frozen=True)
class CapturePart:
    relationship_id: str
    position: int
    holder_id: str
    holder_region: str
    amount_fen: int


@dataclass(frozen=True)
class AcceptedCapture:
    authorization_id: str
    merchant_id: str
    merchant_region: str
    beneficiary_id: str
    purpose: str
    approved_fen: int
    amount_fen: int
    idempotency_key: str
    captured_at: datetime
    parts: tuple[CapturePart, ...]
    # (scope, key, request digest, the encoded answer) for idempotent calls
    answer: tuple[str, str, str, bytes] | None


def load(
    connection: Connection,
    keys: Iterable[tuple[str, str]],
    authorization_ids: Iterable[str],
    relationship_ids: Iterable[str],
) -> BatchState:
    dialect = connection.dialect
    quote = dialect.identifier_preparer.quote
    wanted_keys = set(keys)
    answers: dict[tuple[str, str], StoredAnswer] = {}
    if wanted_keys:
        scopes = sorted({scope for scope, _ in wanted_keys})
        key_list = sorted({key for _, key in wanted_keys})
        # Both columns of the primary key, so SQLite and PostgreSQL search it (by key alone,
        # or by row value IN on SQLite, the table is scanned).
        rows = fetch_all(
            connection,
            f"SELECT scope, idempotency_key, request_digest, response"
            f" FROM {quote(idempotency_records.name)}"
            f" WHERE scope IN ({placeholders(dialect, len(scopes))})"
            f" AND idempotency_key IN ({placeholders(dialect, len(key_list))})",
            [*scopes, *key_list],
        )
        for scope, key, digest, response in rows:
            if (scope, key) in wanted_keys:
                answers[(scope, key)] = StoredAnswer(digest, bytes(response))
    journaled = _journaled(connection, wanted_keys)
    captured: dict[str, list[tuple[str, int]]] = {}
    ids = sorted(set(authorization_ids))
    if ids:
        # The captures already written, with their parts, in one query.
        rows = fetch_all(
            connection,
            f"SELECT c.authorization_id, p.relationship_id, p.amount_fen"
            f" FROM {quote(captures.name)} c"
            f" LEFT JOIN {quote(capture_parts.name)} p ON p.authorization_id = c.authorization_id"
            f" WHERE c.authorization_id IN ({placeholders(dialect, len(ids))})"
            f" ORDER BY c.authorization_id, p.position",
            ids,
        )
        for authorization_id, relationship_id, amount_fen in rows:
            parts = captured.setdefault(authorization_id, [])
            if relationship_id is not None:
                parts.append((relationship_id, amount_fen))
    funding: dict[str, FundingRelationship] = {}
    relationship_list = sorted(set(relationship_ids))
    if relationship_list:
        # Locked in id order, so two batches cannot deadlock each other (PostgreSQL; SQLite's
        # BEGIN IMMEDIATE has locked the whole database already).
        lock = " FOR UPDATE OF r" if dialect.name == "postgresql" else ""
        rows = fetch_all(
            connection,
            f"SELECT r.relationship_id, r.status, r.holder_id, p.pooling_region,"
            f" r.allocated_total_fen, r.released_total_fen, r.captured_total_fen,"
            f" r.refunded_to_quota_total_fen"
            f" FROM {quote(relationships.name)} r"
            f" JOIN {quote(participants.name)} p ON p.participant_id = r.holder_id"
            f" WHERE r.relationship_id IN ({placeholders(dialect, len(relationship_list))})"
            f" ORDER BY r.relationship_id{lock}",
            relationship_list,
        )
        for relationship_id, status, holder_id, region, *totals_fen in rows:
            allocated_fen, released_fen, captured_fen, refunded_fen = totals_fen
            totals = QuotaTotals(
                allocated_total_fen=allocated_fen,
                released_total_fen=released_fen,
                captured_total_fen=captured_fen,
                refunded_to_quota_total_fen=refunded_fen,
            )
            funding[relationship_id] = FundingRelationship(status, holder_id, region, totals)
    voided: set[str] = set()
    if ids:
        # Read after the relationships' locks: a Void marks voided_at under the same locks
        # (storage/sql/open_holds.py, void_in_ledger), so it committed before this read, or
        # waits until this batch has committed; a hold is never both captured and voided, even
        # one a rebuild put back while its capture was being written.
        rows = fetch_all(
            connection,
            f"SELECT authorization_id, voided_at FROM {quote(authorizations.name)}"
            f" WHERE authorization_id IN ({placeholders(dialect, len(ids))})",
            ids,
        )
        voided = {authorization_id for authorization_id, voided_at in rows if voided_at}
    return BatchState(
        answers=answers,
        captured={key: tuple(value) for key, value in captured.items()},
        relationships=funding,
        voided=frozenset(voided),
        journaled=journaled,
    )


def _journaled(
    connection: Connection, wanted_keys: set[tuple[str, str]]
) -> dict[tuple[str, str], JournaledDecision]:
    """The journal's decisions for the batch's one-step payment keys (one query, on the
    unique (merchant_id, idempotency_key) index; none when the batch has no payment)."""
    payments = {
        (scope, scope[len(PAYMENT_SCOPE_PREFIX) :], key)
        for scope, key in wanted_keys
        if scope.startswith(PAYMENT_SCOPE_PREFIX)
    }
    if not payments:
        return {}
    dialect = connection.dialect
    merchants = sorted({merchant for _, merchant, _ in payments})
    key_list = sorted({key for _, _, key in payments})
    rows = fetch_all(
        connection,
        f"SELECT merchant_id, idempotency_key, authorization_id, request_digest, response"
        f" FROM {dialect.identifier_preparer.quote(authorizations.name)}"
        f" WHERE merchant_id IN ({placeholders(dialect, len(merchants))})"
        f" AND idempotency_key IN ({placeholders(dialect, len(key_list))})",
        [*merchants, *key_list],
    )
    found: dict[tuple[str, str], JournaledDecision] = {}
    for merchant_id, key, authorization_id, digest, response in rows:
        scope = payment_scope(merchant_id)
        if (scope, merchant_id, key) in payments:
            found[(scope, key)] = JournaledDecision(
                authorization_id, StoredAnswer(digest, bytes(response))
            )
    return found


@dataclass(frozen=True)
class _Statements:
    """The batch's writes for one dialect, built once (storage.sql.dbapi.py)."""

    captures: BulkInsert
    capture_parts: BulkInsert
    ledger_entries: BulkInsert
    idempotency_records: BulkInsert
    add_captured_total: str


# The columns each insert fills, in the order write() builds its tuples (entry_id is the
# ledger's own).
_CAPTURE_COLUMNS = (
    "authorization_id",
    "merchant_id",
    "merchant_region",
    "beneficiary_id",
    "purpose",
    "approved_fen",
    "amount_fen",
    "refunded_fen",
    "idempotency_key",
    "captured_at",
)
_PART_COLUMNS = (
    "authorization_id",
    "relationship_id",
    "position",
    "holder_id",
    "holder_region",
    "amount_fen",
    "refunded_fen",
)
_LEDGER_COLUMNS = (
    "kind",
    "holder_id",
    "relationship_id",
    "authorization_id",
    "merchant_id",
    "amount_fen",
    "channel",
    "holder_region",
    "merchant_region",
    "created_at",
)
_ANSWER_COLUMNS = ("scope", "idempotency_key", "request_digest", "response", "created_at")


@functools.lru_cache(maxsize=8)
def _statements(dialect: Dialect) -> _Statements:
    quote = dialect.identifier_preparer.quote
    mark = marker(dialect)
    return _Statements(
        captures=BulkInsert.of(captures, dialect, _CAPTURE_COLUMNS),
        capture_parts=BulkInsert.of(capture_parts, dialect, _PART_COLUMNS),
        ledger_entries=BulkInsert.of(ledger_entries, dialect, _LEDGER_COLUMNS),
        idempotency_records=BulkInsert.of(idempotency_records, dialect, _ANSWER_COLUMNS),
        add_captured_total=(
            f"UPDATE {quote(relationships.name)}"
            f" SET captured_total_fen = captured_total_fen + {mark}"
            f" WHERE relationship_id = {mark}"
        ),
    )


def write(connection: Connection, accepted: Sequence[AcceptedCapture]) -> None:
    """One executemany per table for the whole batch, on plain tuples."""
    if not accepted:
        return
    statements = _statements(connection.dialect)
    statements.captures.run(
        connection,
        [
            (
                capture.authorization_id,
                capture.merchant_id,
                capture.merchant_region,
                capture.beneficiary_id,
                capture.purpose,
                capture.approved_fen,
                capture.amount_fen,
                0,
                capture.idempotency_key,
                capture.captured_at,
            )
            for capture in accepted
        ],
    )
    parts = [(capture, part) for capture in accepted for part in capture.parts]
    if parts:
        statements.capture_parts.run(
            connection,
            [
                (
                    capture.authorization_id,
                    part.relationship_id,
                    part.position,
                    part.holder_id,
                    part.holder_region,
                    part.amount_fen,
                    0,
                )
                for capture, part in parts
            ],
        )
        capture_kind = LedgerKind.CAPTURE.value
        statements.ledger_entries.run(
            connection,
            [
                (
                    capture_kind,
                    part.holder_id,
                    part.relationship_id,
                    capture.authorization_id,
                    capture.merchant_id,
                    part.amount_fen,
                    None,
                    part.holder_region,
                    capture.merchant_region,
                    capture.captured_at,
                )
                for capture, part in parts
            ],
        )
        totals: dict[str, int] = {}
        for _, part in parts:
            totals[part.relationship_id] = totals.get(part.relationship_id, 0) + part.amount_fen
        run_many(
            connection,
            statements.add_captured_total,
            [(fen, relationship_id) for relationship_id, fen in sorted(totals.items())],
        )
    answers = [
        (*capture.answer, capture.captured_at) for capture in accepted if capture.answer is not None
    ]
    statements.idempotency_records.run(connection, answers)
