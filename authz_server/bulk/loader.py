"""Bulk loading of the registry from CSV files (`medwallet-authz load-csv`).

The file formats are in `authz_server.bulk.csv_formats`. What a load guarantees:

- Same rules as the API. Every field passes `domain.validation`, every relationship
  `domain.relationships.check_proposal` and `check_balance`; every money movement writes the
  ledger row the services write (ACCOUNT_CREDIT, QUOTA_ALLOCATION), every relationship its
  events (PROPOSED, CONSENTED by each party, ACTIVATED) with channel PROVINCIAL_PLATFORM, and
  every credit its idempotency record (scope "credit", the digest CreditPersonalAccount computes
  for the same request), so an API retry with the same key and body is answered, not credited.
- Bad rows are reported (file, line, field, why) and skipped; the load goes on. A rerun of the
  same files changes nothing that was loaded (participants and relationships already there
  count as "unchanged", credits by their idempotency key).
- Fast: rows go in batches (default 5,000), one transaction each, with one query per batch
  for the state the rules need (existing ids, balances, open pairs, known keys), multi-row
  inserts (PostgreSQL: COPY), and balances changed by one executemany UPDATE of the per-
  participant sums. A server may run during a load: on SQLite each batch takes the write lock
  up front (BEGIN IMMEDIATE); on PostgreSQL a relationship batch locks its participants (FOR
  UPDATE) before checking balances, a credit batch adds to balances with a relative UPDATE, and
  a batch that collides with a concurrent write is retried with fresh state.
- Redis is not touched. The server's start-up reconcile (`runtime/reconcile.py`) gives every
  active relationship its quota from SQL; for a server already running, run
  `medwallet-authz reconcile` after the load (until then GetRelationship restores a quota it
  does not find in Redis from SQL, but authorizations only see quotas Redis has).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    DateTime,
    Engine,
    String,
    Table,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError, OperationalError

from authz_server.bulk import csv_formats
from authz_server.bulk.csv_formats import (
    CreditRecord,
    Format,
    Kind,
    ParticipantRecord,
    RelationshipRecord,
)
from authz_server.domain import relationships as rules
from authz_server.domain.errors import InvalidArgument, PolicyRefusal
from authz_server.domain.model import CatalogItem, Merchant, Participant
from authz_server.domain.types import (
    Channel,
    LedgerKind,
    ParticipantStatus,
    Party,
    Relation,
    RelationshipStatus,
    Scheme,
)
from authz_server.generated.medwallet.v1 import registry_pb2
from authz_server.runtime.progress import Progress
from authz_server.server import convert
from authz_server.server.registry_handler import _encode_credit
from authz_server.service.registry import CreditResult
from authz_server.storage.sql.database import _sqlite_pragmas
from authz_server.storage.sql.tables import (
    CatalogItemRow,
    IdempotencyRecordRow,
    LedgerEntryRow,
    MerchantRow,
    ParticipantRow,
    RelationshipEventRow,
    RelationshipRow,
)

log = logging.getLogger(__name__)

R = TypeVar("R")
DEFAULT_BATCH_SIZE = 5000
CREDIT_SCOPE = "credit"
CHANNEL = Channel.PROVINCIAL_PLATFORM
ATTEMPTS = 3

PARTICIPANTS: Table = ParticipantRow.__table__  # type: ignore[assignment]
MERCHANTS: Table = MerchantRow.__table__  # type: ignore[assignment]
ITEMS: Table = CatalogItemRow.__table__  # type: ignore[assignment]
RELATIONSHIPS: Table = RelationshipRow.__table__  # type: ignore[assignment]
EVENTS: Table = RelationshipEventRow.__table__  # type: ignore[assignment]
LEDGER: Table = LedgerEntryRow.__table__  # type: ignore[assignment]
IDEMPOTENCY: Table = IdempotencyRecordRow.__table__  # type: ignore[assignment]

FORMATS: dict[Kind, Format[Any]] = {
    Kind.PARTICIPANTS: csv_formats.PARTICIPANTS,
    Kind.CREDITS: csv_formats.CREDITS,
    Kind.MERCHANTS: csv_formats.MERCHANTS,
    Kind.ITEMS: csv_formats.ITEMS,
    Kind.RELATIONSHIPS: csv_formats.RELATIONSHIPS,
}
TIMESTAMP = DateTime(timezone=True)
# The ledger columns a bulk load writes (the others stay NULL), entry_id first.
LEDGER_COLUMNS = (
    "entry_id",
    "kind",
    "holder_id",
    "relationship_id",
    "amount_fen",
    "channel",
    "created_at",
)
OPEN = [status.value for status in rules.OPEN_STATUSES]
# The field a relationship refusal is about (PARTICIPANT_NOT_ACTIVE: whichever is not active).
REFUSAL_FIELDS = {
    "SELF_SHARING": "beneficiary_id",
    "HOLDER_NOT_EMPLOYEE": "holder_id",
    "RELATION_NOT_ALLOWED": "relation",
    "DUPLICATE_RELATIONSHIP": "beneficiary_id",
    "INSUFFICIENT_BALANCE": "quota_fen",
}


def _decoded_lines(data: Iterable[bytes]) -> Iterator[str]:
    """A CSV file's lines as text, each decoded on its own (a byte that is not UTF-8 is kept as
    a lone surrogate, so its row, and only it, is rejected at its own line: decoding the file as
    a whole failed at the chunk of ~8 KiB the decoder read, reported a line hundreds of rows
    earlier and dropped the batch being gathered). A UTF-8 byte order mark is skipped."""
    first = True
    for raw in data:
        if first and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        first = False
        yield raw.decode("utf-8", errors="surrogateescape")


def _utf8(row: list[str]) -> bool:
    """Whether a row read by _decoded_lines was UTF-8 throughout."""
    try:
        "".join(row).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Rejection:
    """A row that was not loaded: where it is, which field, and why (reason code first)."""

    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.reason}"


@dataclass
class FileReport:
    kind: Kind
    path: Path
    loaded: int = 0
    unchanged: int = 0
    rejected: int = 0
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return self.loaded + self.unchanged + self.rejected

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.kind.value:<13} {self.path}: {self.loaded:,} loaded, {self.unchanged:,}"
            f" unchanged, {self.rejected:,} rejected in {self.seconds:.1f}s"
            f" ({self.rows_per_second:,.0f} rows/s)"
        )


@dataclass
class LoadReport:
    files: list[FileReport] = field(default_factory=list)
    # The first `keep_rejections` rejections (all of them go to the stream / rejects file).
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return sum(report.rejected for report in self.files)

    def file(self, kind: Kind) -> FileReport:
        return next(report for report in self.files if report.kind is kind)

    def summary(self) -> str:
        lines = [str(report) for report in self.files]
        if any(r.kind is Kind.RELATIONSHIPS and r.loaded for r in self.files):
            lines.append(
                "Redis quotas: a server starting now picks the new relationships up by itself;"
                " for a running one, run `medwallet-authz reconcile`."
            )
        return "\n".join(lines)


@dataclass
class _Outcome:
    """What one batch did; only counted once its transaction committed."""

    loaded: int = 0
    unchanged: int = 0
    rejections: list[tuple[int, str, str]] = field(default_factory=list)

    def reject(self, line: int, field: str, why: str) -> None:
        self.rejections.append((line, field, why))


@dataclass
class _Account:
    scheme: str
    balance_fen: int


@dataclass
class _Batch(Generic[R]):
    records: list[tuple[int, R]]
    rejections: list[tuple[int, str, str]]
    consumed: int


def credit_digest(record: CreditRecord) -> str:
    """The request digest CreditPersonalAccount stores for the same credit."""
    return convert.digest(
        registry_pb2.CreditPersonalAccountRequest(
            participant_id=record.participant_id,
            amount_fen=record.amount_fen,
            idempotency_key=record.idempotency_key,
        )
    )


def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_connection, record)
    # Transactions are begun by the "begin" hook below (BEGIN IMMEDIATE), not by the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def count_rows(path: Path) -> int:
    """Lines after the header (for the progress bar; quoted line breaks make it approximate)."""
    lines = 0
    last = b""
    with path.open("rb") as data:
        for chunk in iter(lambda: data.read(1 << 20), b""):
            lines += chunk.count(b"\n")
            last = chunk
    if last and not last.endswith(b"\n"):
        lines += 1
    return max(0, lines - 1)


class BulkLoader:
    """Loads CSV files into the system of record; see the module docstring."""

    def __init__(
        self,
        database_url: str,
        *,
        allowed_relations: frozenset[Relation] = rules.DEFAULT_ALLOWED_RELATIONS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        stream: TextIO | None = None,
        rejects: TextIO | None = None,
        print_limit: int = 100,
        keep_rejections: int = 10_000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.engine = make_engine(database_url)
        self.is_postgresql = self.engine.dialect.name == "postgresql"
        self.allowed_relations = allowed_relations
        self.batch_size = batch_size
        self.stream = stream
        self.rejects = csv.writer(rejects) if rejects is not None else None
        if self.rejects is not None:
            self.rejects.writerow(["file", "line", "field", "reason"])
        self.print_limit = print_limit
        self.keep_rejections = keep_rejections
        self.clock = clock

    def __enter__(self) -> BulkLoader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    def load(self, files: Sequence[tuple[Kind, Path]]) -> LoadReport:
        """Loads the files, participants first and relationships last (see `Kind`)."""
        report = LoadReport()
        order = list(Kind)
        for kind, path in sorted(files, key=lambda pair: order.index(pair[0])):
            report.files.append(self.load_file(kind, path, report))
        return report

    def load_file(self, kind: Kind, path: Path, report: LoadReport | None = None) -> FileReport:
        report = report if report is not None else LoadReport()
        result = FileReport(kind, path)
        appliers: dict[Kind, Callable[[Connection, list[tuple[int, Any]]], _Outcome]] = {
            Kind.PARTICIPANTS: self._participants,
            Kind.CREDITS: self._credits,
            Kind.MERCHANTS: self._merchants,
            Kind.ITEMS: self._items,
            Kind.RELATIONSHIPS: self._relationships,
        }
        apply = appliers[kind]
        printed = 0

        def reject(progress: Progress, line: int, field: str, why: str) -> None:
            nonlocal printed
            rejection = Rejection(str(path), line, field, why)
            result.rejected += 1
            if len(report.rejections) < self.keep_rejections:
                report.rejections.append(rejection)
            if self.rejects is not None:
                self.rejects.writerow([rejection.file, line, field, why])
            if printed < self.print_limit:
                progress.note(str(rejection))
            elif printed == self.print_limit:
                progress.note(f"{path}: more rejected rows are not shown here (see --rejects)")
            printed += 1

        try:
            total: int | None = count_rows(path)
        except OSError:
            total = None  # reading it will report why
        with Progress(total, f"{kind.value} {path.name}", stream=self.stream) as bar:
            try:
                for batch in self._batches(path, FORMATS[kind]):
                    for line, field_name, why in batch.rejections:
                        reject(bar, line, field_name, why)
                    if batch.records:
                        outcome = self._transaction(apply, batch.records)
                        result.loaded += outcome.loaded
                        result.unchanged += outcome.unchanged
                        for line, field_name, why in outcome.rejections:
                            reject(bar, line, field_name, why)
                    bar.advance(batch.consumed)
            except _FileError as error:
                reject(bar, error.line, error.field, error.why)
            result.seconds = bar.elapsed
        return result

    # Reading

    def _batches(self, path: Path, spec: Format[R]) -> Iterator[_Batch[R]]:
        """Parsed rows in batches; rows failing field validation come back as rejections."""
        line = 1
        try:
            with path.open("rb") as data:
                reader = csv.reader(_decoded_lines(data))
                header = next(reader, None)
                if header is None:
                    raise _FileError(1, "header", "the file is empty; a header row is required")
                try:
                    positions = spec.reorder(header)
                except InvalidArgument as error:
                    raise _FileError(1, error.field, error.why) from None
                width = len(header)
                line = reader.line_num  # the header's last line
                batch: _Batch[R] = _Batch([], [], 0)
                while True:
                    try:
                        row = next(reader)
                    except StopIteration:
                        break
                    except csv.Error as error:
                        # The rows gathered before it are loaded (or reported) first: dropped
                        # with the batch, they were neither, the report naming one bad row.
                        if batch.consumed:
                            yield batch
                        raise _FileError(
                            line + 1, "file", f"cannot be read further: {error}"
                        ) from None
                    # A row begins on the line after the previous one ended (an unclosed quote
                    # reads the following lines into it): reported where it begins.
                    first, line = line + 1, reader.line_num
                    if not row:
                        continue
                    batch.consumed += 1
                    where = (
                        ""
                        if line == first
                        else f" (the row runs on to line {line}: an unclosed quote?)"
                    )
                    if not _utf8(row):
                        batch.rejections.append((first, "row", "is not UTF-8 text" + where))
                    elif len(row) != width:
                        batch.rejections.append(
                            (first, "row", f"has {len(row)} fields; the header has {width}{where}")
                        )
                    else:
                        try:
                            record = spec.parse([row[i] for i in positions])
                        except InvalidArgument as error:
                            batch.rejections.append((first, error.field, error.why + where))
                        else:
                            batch.records.append((first, record))
                    if len(batch.records) >= self.batch_size:
                        yield batch
                        batch = _Batch([], [], 0)
                if batch.consumed:
                    yield batch
        except csv.Error as error:  # the header row
            raise _FileError(line, "file", f"cannot be read further: {error}") from None
        except OSError as error:
            raise _FileError(0, "file", f"cannot be read: {error}") from None

    # Writing

    def _transaction(
        self,
        apply: Callable[[Connection, list[tuple[int, Any]]], _Outcome],
        records: list[tuple[int, Any]],
    ) -> _Outcome:
        """One batch in one transaction; retried when a concurrent writer got in the way (the
        retry reads the state again, so the rules see what that writer did)."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with self.engine.begin() as connection:
                    if self.is_postgresql:
                        # A batch looks up thousands of keys at once (= ANY(array)); on tables
                        # that are filling up, the planner's statistics are stale and it picks a
                        # full scan per batch (quadratic over a load). Index probes it is.
                        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
                    return apply(connection, records)
            except (IntegrityError, OperationalError) as error:
                if attempt == ATTEMPTS:
                    raise
                log.warning("batch failed (%s); retrying", error.orig)
        raise AssertionError("unreachable")

    def _stamp(self, moment: datetime) -> Any:
        """A timestamp as the driver takes it (SQLite: the text SQLAlchemy's DateTime writes)."""
        if self.is_postgresql:
            return moment
        dialect = self.engine.dialect
        process = TIMESTAMP.dialect_impl(dialect).bind_processor(dialect)
        return process(moment) if process else moment

    def _among(self, column: ColumnElement[str], values: Iterable[str]) -> ColumnElement[bool]:
        """`column IN values` with one bound parameter however many values (no big IN lists)."""
        unique = list(set(values))
        if self.is_postgresql:
            return column == any_(bindparam(None, unique, type_=ARRAY(String())))
        listed = func.json_each(bindparam(None, json.dumps(unique), type_=String()))
        return column.in_(select(literal_column("value")).select_from(listed))

    def _insert(
        self,
        connection: Connection,
        table: Table,
        columns: Sequence[str],
        rows: list[tuple[Any, ...]],
        *,
        upsert_key: str | None = None,
    ) -> None:
        """Inserts rows of driver-ready values (see `_stamp`): PostgreSQL COPY, SQLite one
        prepared statement executed for all rows. With `upsert_key`, rows already there are
        updated instead (INSERT ... ON CONFLICT on both)."""
        if not rows:
            return
        names = ", ".join(columns)
        raw = connection.connection.driver_connection
        assert raw is not None
        if self.is_postgresql and upsert_key is None:
            with (
                raw.cursor() as cursor,
                cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
            return
        marker = "%s" if self.is_postgresql else "?"
        statement = (
            f"INSERT INTO {table.name} ({names}) VALUES ({', '.join([marker] * len(columns))})"
        )
        if upsert_key is not None:
            updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != upsert_key)
            statement += f" ON CONFLICT ({upsert_key}) DO UPDATE SET {updates}"
        connection.exec_driver_sql(statement, rows)

    def _add_to_balances(self, connection: Connection, deltas: dict[str, int]) -> dict[str, int]:
        """Adds each participant's (signed) sum to their balance, in one statement. On
        PostgreSQL returns the balances after it (SQLite: {}; the batch's write lock means they
        are what the batch read plus the sums)."""
        changes = [(delta, key) for key, delta in deltas.items() if delta]
        if not changes:
            return {}
        if self.is_postgresql:
            result = connection.exec_driver_sql(
                "UPDATE participants AS p SET balance_fen = p.balance_fen + d.delta"
                " FROM unnest(%s::bigint[], %s::text[]) AS d(delta, id)"
                " WHERE p.participant_id = d.id RETURNING p.participant_id, p.balance_fen",
                ([delta for delta, _ in changes], [key for _, key in changes]),
            )
            return {key: balance for key, balance in result.all()}
        connection.exec_driver_sql(
            "UPDATE participants SET balance_fen = balance_fen + ? WHERE participant_id = ?",
            changes,
        )
        return {}

    def _ledger_ids(self, connection: Connection, count: int) -> list[int]:
        """Ids for new ledger rows, taken before they are written (COPY cannot return them):
        from the sequence on PostgreSQL; on SQLite, after the largest, which is safe because the
        batch holds the write lock from its start (BEGIN IMMEDIATE)."""
        if self.is_postgresql:
            return list(
                connection.exec_driver_sql(
                    "SELECT nextval(pg_get_serial_sequence('ledger_entries', 'entry_id'))"
                    " FROM generate_series(1, %s)",
                    (count,),
                ).scalars()
            )
        last = connection.exec_driver_sql("SELECT max(entry_id) FROM ledger_entries").scalar()
        first = (last or 0) + 1
        return list(range(first, first + count))

    # One batch of each kind

    def _participants(
        self, connection: Connection, batch: list[tuple[int, ParticipantRecord]]
    ) -> _Outcome:
        table = PARTICIPANTS
        outcome = _Outcome()
        known: dict[str, tuple[str, str]] = {
            row.participant_id: (row.scheme, row.pooling_region)
            for row in connection.execute(
                select(table.c.participant_id, table.c.scheme, table.c.pooling_region).where(
                    self._among(table.c.participant_id, (r.participant_id for _, r in batch))
                )
            )
        }
        now = self._stamp(self.clock())
        active = ParticipantStatus.ACTIVE.value
        rows: list[tuple[Any, ...]] = []
        for line, record in batch:
            wanted = (record.scheme.value, record.pooling_region)
            prior = known.get(record.participant_id)
            if prior is None:
                known[record.participant_id] = wanted
                rows.append((record.participant_id, *wanted, active, 0, now, now))
            elif prior == wanted:
                outcome.unchanged += 1
            else:
                outcome.reject(
                    line,
                    "scheme" if prior[0] != wanted[0] else "pooling_region",
                    "CHANGE_REQUIRES_INSURANCE_EVENT: participant "
                    f"{record.participant_id} exists as {prior[0]} in {prior[1]}; a scheme or"
                    " region changes through ReportInsuranceEvent",
                )
        columns = ("participant_id", "scheme", "pooling_region", "status", "balance_fen")
        self._insert(connection, table, (*columns, "created_at", "updated_at"), rows)
        outcome.loaded = len(rows)
        return outcome

    def _credits(self, connection: Connection, batch: list[tuple[int, CreditRecord]]) -> _Outcome:
        outcome = _Outcome()
        people = PARTICIPANTS
        query = select(people.c.participant_id, people.c.scheme, people.c.balance_fen).where(
            self._among(people.c.participant_id, (r.participant_id for _, r in batch))
        )
        # Not locked: the balance changes by a relative UPDATE, which returns the final figure.
        accounts = {
            row.participant_id: _Account(row.scheme, row.balance_fen)
            for row in connection.execute(query).all()
        }
        digests: dict[str, str] = {
            row.idempotency_key: row.request_digest
            for row in connection.execute(
                select(IDEMPOTENCY.c.idempotency_key, IDEMPOTENCY.c.request_digest).where(
                    IDEMPOTENCY.c.scope == CREDIT_SCOPE,
                    self._among(
                        IDEMPOTENCY.c.idempotency_key, (r.idempotency_key for _, r in batch)
                    ),
                )
            )
        }
        accepted: list[tuple[CreditRecord, str, int]] = []
        deltas: dict[str, int] = {}
        for line, record in batch:
            digest = credit_digest(record)
            earlier = digests.get(record.idempotency_key)
            if earlier is not None:
                if earlier == digest:
                    outcome.unchanged += 1
                else:
                    outcome.reject(
                        line,
                        "idempotency_key",
                        f"IDEMPOTENCY_KEY_REUSED: {record.idempotency_key!r} was already used"
                        " with a different request",
                    )
                continue
            account = accounts.get(record.participant_id)
            if account is None:
                outcome.reject(
                    line, "participant_id", f"NOT_FOUND: participant {record.participant_id}"
                )
                continue
            if account.scheme != Scheme.EMPLOYEE.value:
                outcome.reject(
                    line,
                    "participant_id",
                    f"NO_PERSONAL_ACCOUNT: {record.participant_id} is not in the employee scheme",
                )
                continue
            account.balance_fen += record.amount_fen
            deltas[record.participant_id] = deltas.get(record.participant_id, 0) + record.amount_fen
            digests[record.idempotency_key] = digest
            accepted.append((record, digest, account.balance_fen))
        if not accepted:
            return outcome
        finals = self._add_to_balances(connection, deltas)
        if finals:  # what other writers added since the read comes before this batch's credits
            offsets = {key: finals[key] - accounts[key].balance_fen for key in deltas}
            accepted = [(r, d, b + offsets[r.participant_id]) for r, d, b in accepted]
        now = self._stamp(self.clock())
        entry_ids = self._ledger_ids(connection, len(accepted))
        credit = LedgerKind.ACCOUNT_CREDIT.value
        self._insert(
            connection,
            LEDGER,
            LEDGER_COLUMNS,
            [
                (entry_id, credit, record.participant_id, None, record.amount_fen, None, now)
                for (record, _, _), entry_id in zip(accepted, entry_ids, strict=True)
            ],
        )
        self._insert(
            connection,
            IDEMPOTENCY,
            ("scope", "idempotency_key", "request_digest", "response", "created_at"),
            [
                (
                    CREDIT_SCOPE,
                    record.idempotency_key,
                    digest,
                    _encode_credit(CreditResult(balance, entry_id)),
                    now,
                )
                for (record, digest, balance), entry_id in zip(accepted, entry_ids, strict=True)
            ],
        )
        outcome.loaded = len(accepted)
        return outcome

    def _merchants(self, connection: Connection, batch: list[tuple[int, Merchant]]) -> _Outcome:
        now = self._stamp(self.clock())
        rows = {
            m.merchant_id: (
                m.merchant_id,
                m.kind.value,
                m.pooling_region,
                m.designated,
                m.name,
                now,
            )
            for _, m in batch
        }
        columns = ("merchant_id", "kind", "pooling_region", "designated", "name", "updated_at")
        self._insert(connection, MERCHANTS, columns, list(rows.values()), upsert_key="merchant_id")
        return _Outcome(loaded=len(batch))

    def _items(self, connection: Connection, batch: list[tuple[int, CatalogItem]]) -> _Outcome:
        now = self._stamp(self.clock())
        rows = {
            i.item_code: (i.item_code, i.name, i.category.value, i.eligible, now) for _, i in batch
        }
        columns = ("item_code", "name", "category", "eligible", "updated_at")
        self._insert(connection, ITEMS, columns, list(rows.values()), upsert_key="item_code")
        return _Outcome(loaded=len(batch))

    def _relationships(
        self, connection: Connection, batch: list[tuple[int, RelationshipRecord]]
    ) -> _Outcome:
        outcome = _Outcome()
        shares = RELATIONSHIPS
        people = PARTICIPANTS
        existing: dict[str, tuple[str, str, str, int]] = {
            row.relationship_id: (
                row.holder_id,
                row.beneficiary_id,
                row.relation,
                row.allocated_total_fen,
            )
            for row in connection.execute(
                select(
                    shares.c.relationship_id,
                    shares.c.holder_id,
                    shares.c.beneficiary_id,
                    shares.c.relation,
                    shares.c.allocated_total_fen,
                ).where(
                    self._among(shares.c.relationship_id, (r.relationship_id for _, r in batch))
                )
            )
        }
        holder_ids = {record.holder_id for _, record in batch}
        party_ids = holder_ids | {record.beneficiary_id for _, record in batch}
        query = select(
            people.c.participant_id,
            people.c.scheme,
            people.c.pooling_region,
            people.c.status,
            people.c.balance_fen,
        ).where(self._among(people.c.participant_id, party_ids))
        if self.is_postgresql:
            query = query.with_for_update()
        schemes = {scheme.value: scheme for scheme in Scheme}
        statuses = {status.value: status for status in ParticipantStatus}
        # The rules never read updated_at; the batch's clock stands in for it.
        moment = self.clock()
        participants = {
            key: Participant(key, schemes[scheme], region, statuses[status], balance, moment)
            for key, scheme, region, status, balance in connection.execute(query).all()
        }
        open_pairs: set[tuple[str, str]] = {
            (row.holder_id, row.beneficiary_id)
            for row in connection.execute(
                select(shares.c.holder_id, shares.c.beneficiary_id).where(
                    self._among(shares.c.holder_id, holder_ids), shares.c.status.in_(OPEN)
                )
            )
        }
        accepted: list[RelationshipRecord] = []
        for line, record in batch:
            wanted = (record.holder_id, record.beneficiary_id, record.relation.value)
            prior = existing.get(record.relationship_id)
            if prior is not None:
                if prior == (*wanted, record.quota_fen):
                    outcome.unchanged += 1
                else:
                    outcome.reject(
                        line,
                        "relationship_id",
                        f"ALREADY_EXISTS: relationship {record.relationship_id} exists with"
                        " another holder, beneficiary, relation or quota",
                    )
                continue
            holder = participants.get(record.holder_id)
            beneficiary = participants.get(record.beneficiary_id)
            if holder is None or beneficiary is None:
                missing = "holder_id" if holder is None else "beneficiary_id"
                outcome.reject(
                    line,
                    missing,
                    "NOT_FOUND: participant "
                    f"{record.holder_id if holder is None else record.beneficiary_id}",
                )
                continue
            try:
                rules.check_proposal(
                    holder,
                    beneficiary,
                    record.relation,
                    self.allowed_relations,
                    (record.holder_id, record.beneficiary_id) in open_pairs,
                )
                if record.quota_fen:
                    rules.check_balance(holder, record.quota_fen)
            except PolicyRefusal as refusal:
                field_name = REFUSAL_FIELDS.get(refusal.reason)
                if field_name is None:  # PARTICIPANT_NOT_ACTIVE
                    active = holder.status is ParticipantStatus.ACTIVE
                    field_name = "beneficiary_id" if active else "holder_id"
                outcome.reject(line, field_name, f"{refusal.reason}: {refusal.message}")
                continue
            if record.quota_fen:
                participants[record.holder_id] = Participant(
                    holder.participant_id,
                    holder.scheme,
                    holder.pooling_region,
                    holder.status,
                    holder.balance_fen - record.quota_fen,
                    holder.updated_at,
                )
            open_pairs.add((record.holder_id, record.beneficiary_id))
            existing[record.relationship_id] = (*wanted, record.quota_fen)
            accepted.append(record)
        if accepted:
            self._write_relationships(connection, accepted)
        outcome.loaded = len(accepted)
        return outcome

    def _write_relationships(
        self, connection: Connection, accepted: list[RelationshipRecord]
    ) -> None:
        now = self._stamp(self.clock())
        channel = CHANNEL.value
        active = RelationshipStatus.ACTIVE.value
        self._insert(
            connection,
            RELATIONSHIPS,
            (
                "relationship_id",
                "holder_id",
                "beneficiary_id",
                "relation",
                "status",
                "holder_consented",
                "beneficiary_consented",
                "created_channel",
                "created_at",
                "activated_at",
                "allocated_total_fen",
                "released_total_fen",
                "captured_total_fen",
                "refunded_to_quota_total_fen",
            ),
            [
                (
                    r.relationship_id,
                    r.holder_id,
                    r.beneficiary_id,
                    r.relation.value,
                    active,
                    True,
                    True,
                    channel,
                    now,
                    now,
                    r.quota_fen,
                    0,
                    0,
                    0,
                )
                for r in accepted
            ],
        )
        steps = (
            ("PROPOSED", None),
            ("CONSENTED", Party.HOLDER.value),
            ("CONSENTED", Party.BENEFICIARY.value),
            ("ACTIVATED", None),
        )
        self._insert(
            connection,
            EVENTS,
            ("relationship_id", "event", "party", "channel", "created_at"),
            [
                (r.relationship_id, name, party, channel, now)
                for r in accepted
                for name, party in steps
            ],
        )
        funded = [record for record in accepted if record.quota_fen]
        allocation = LedgerKind.QUOTA_ALLOCATION.value
        self._insert(
            connection,
            LEDGER,
            LEDGER_COLUMNS[1:],
            [
                (allocation, r.holder_id, r.relationship_id, r.quota_fen, channel, now)
                for r in funded
            ],
        )
        deltas: dict[str, int] = {}
        for record in funded:
            deltas[record.holder_id] = deltas.get(record.holder_id, 0) - record.quota_fen
        self._add_to_balances(connection, deltas)


class _FileError(Exception):
    """The rest of a file cannot be read (no header, bad encoding): reported as one rejection."""

    def __init__(self, line: int, field: str, why: str) -> None:
        super().__init__(why)
        self.line = line
        self.field = field
        self.why = why
