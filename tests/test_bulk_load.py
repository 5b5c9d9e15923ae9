"""The CSV bulk loader (`medwallet-authz load-csv`) against the session's real database and server.

Every test uses fresh unique ids, so it shares the harness database with the other tests.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

from authz_server.bulk import BulkLoader, Kind, LoadReport
from authz_server.cli import main
from authz_server.domain.types import Relation
from authz_server.generated.medwallet.v1 import common_pb2, registry_pb2, relationship_pb2
from authz_server.runtime.progress import Progress
from authz_server.runtime.reconcile import reconcile
from authz_server.storage.sql.tables import (
    CatalogItemRow,
    IdempotencyRecordRow,
    LedgerEntryRow,
    MerchantRow,
    RelationshipEventRow,
    RelationshipRow,
)
from tests import factories
from tests.harness import ADMIN, APP, Harness, new_id

HEADERS = {
    Kind.PARTICIPANTS: ["participant_id", "scheme", "pooling_region"],
    Kind.CREDITS: ["participant_id", "amount_fen", "idempotency_key"],
    Kind.MERCHANTS: ["merchant_id", "kind", "pooling_region", "designated", "name"],
    Kind.ITEMS: ["item_code", "name", "category", "eligible"],
    Kind.RELATIONSHIPS: ["relationship_id", "holder_id", "beneficiary_id", "relation", "quota_fen"],
}


@pytest.fixture(scope="module")
def engine(harness: Harness) -> Iterator[Engine]:
    made = create_engine(harness.database_url)
    yield made
    made.dispose()


def write(directory: Path, kind: Kind, rows: Sequence[Sequence[object]]) -> Path:
    path = directory / f"{kind.value}-{new_id('f')}.csv"
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(HEADERS[kind])
        writer.writerows(rows)
    return path


def load(
    harness: Harness,
    directory: Path,
    files: dict[Kind, Sequence[Sequence[object]]],
    **options: object,
) -> LoadReport:
    paths = [(kind, write(directory, kind, rows)) for kind, rows in files.items()]
    with BulkLoader(harness.database_url, stream=io.StringIO(), **options) as loader:
        return loader.load(paths)


def rejected(report: LoadReport) -> set[tuple[int, str]]:
    return {(r.line, r.field) for r in report.rejections}


def reasons(report: LoadReport) -> dict[tuple[int, str], str]:
    return {(r.line, r.field): r.reason for r in report.rejections}


def ledger(engine: Engine, holder_id: str) -> list[tuple[str, int, str | None]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(LedgerEntryRow.kind, LedgerEntryRow.amount_fen, LedgerEntryRow.relationship_id)
            .where(LedgerEntryRow.holder_id == holder_id)
            .order_by(LedgerEntryRow.entry_id)
        ).all()
    return [tuple(row) for row in rows]


def test_good_rows_load_with_balances_ledger_and_events(harness, registry, engine, tmp_path):
    emp, emp2, res = new_id("emp"), new_id("emp"), new_id("res")
    share, share2 = new_id("rel"), new_id("rel")
    merchant, item = new_id("m"), new_id("item")
    key1, key2, key3 = new_id("k"), new_id("k"), new_id("k")
    report = load(
        harness,
        tmp_path,
        {
            Kind.PARTICIPANTS: [
                [emp, "EMPLOYEE", "110100"],
                [emp2, "EMPLOYEE", "310100"],
                [res, "RESIDENT", "440300"],
            ],
            Kind.CREDITS: [[emp, 70_000, key1], [emp, 30_000, key2], [emp2, 5_000, key3]],
            Kind.MERCHANTS: [[merchant, "RETAIL_PHARMACY", "440300", "true", "Pharmacy 1"]],
            Kind.ITEMS: [[item, "Aspirin", "DRUG", "yes"]],
            Kind.RELATIONSHIPS: [
                [share, emp, res, "PARENT", 40_000],
                [share2, emp2, emp, "SPOUSE", ""],
            ],
        },
    )
    assert report.rejected == 0, report.rejections
    assert [(f.kind, f.loaded) for f in report.files] == [
        (Kind.PARTICIPANTS, 3),
        (Kind.CREDITS, 3),
        (Kind.MERCHANTS, 1),
        (Kind.ITEMS, 1),
        (Kind.RELATIONSHIPS, 2),
    ]
    assert factories.balance(registry, emp) == 60_000
    assert factories.balance(registry, emp2) == 5_000
    assert factories.balance(registry, res) == 0
    assert ledger(engine, emp) == [
        ("ACCOUNT_CREDIT", 70_000, None),
        ("ACCOUNT_CREDIT", 30_000, None),
        ("QUOTA_ALLOCATION", 40_000, share),
    ]
    assert ledger(engine, emp2) == [("ACCOUNT_CREDIT", 5_000, None)]
    with engine.connect() as connection:
        events = connection.execute(
            select(
                RelationshipEventRow.event, RelationshipEventRow.party, RelationshipEventRow.channel
            )
            .where(RelationshipEventRow.relationship_id == share)
            .order_by(RelationshipEventRow.event_id)
        ).all()
        assert [tuple(e) for e in events] == [
            ("PROPOSED", None, "PROVINCIAL_PLATFORM"),
            ("CONSENTED", "HOLDER", "PROVINCIAL_PLATFORM"),
            ("CONSENTED", "BENEFICIARY", "PROVINCIAL_PLATFORM"),
            ("ACTIVATED", None, "PROVINCIAL_PLATFORM"),
        ]
        row = connection.execute(
            select(RelationshipRow).where(RelationshipRow.relationship_id == share)
        ).one()
        assert (row.status, row.holder_consented, row.beneficiary_consented) == (
            "ACTIVE",
            True,
            True,
        )
        assert (row.created_channel, row.allocated_total_fen, row.relation) == (
            "PROVINCIAL_PLATFORM",
            40_000,
            "PARENT",
        )
        keys = connection.execute(
            select(func.count()).where(
                IdempotencyRecordRow.scope == "credit",
                IdempotencyRecordRow.idempotency_key.in_([key1, key2, key3]),
            )
        ).scalar()
        assert keys == 3
        shop = connection.execute(
            select(MerchantRow).where(MerchantRow.merchant_id == merchant)
        ).one()
        assert (shop.kind, shop.pooling_region, shop.designated, shop.name) == (
            "RETAIL_PHARMACY",
            "440300",
            True,
            "Pharmacy 1",
        )
        drug = connection.execute(
            select(CatalogItemRow).where(CatalogItemRow.item_code == item)
        ).one()
        assert (drug.name, drug.category, drug.eligible) == ("Aspirin", "DRUG", True)


def test_rerunning_the_same_files_changes_nothing(harness, registry, engine, tmp_path):
    emp, res, share, key = new_id("emp"), new_id("res"), new_id("rel"), new_id("k")
    files: dict[Kind, Sequence[Sequence[object]]] = {
        Kind.PARTICIPANTS: [[emp, "EMPLOYEE", "110100"], [res, "RESIDENT", "110100"]],
        Kind.CREDITS: [[emp, 10_000, key]],
        Kind.RELATIONSHIPS: [[share, emp, res, "CHILD", 4_000]],
    }
    first = load(harness, tmp_path, files)
    second = load(harness, tmp_path, files)
    assert [f.loaded for f in first.files] == [2, 1, 1]
    assert [(f.loaded, f.unchanged, f.rejected) for f in second.files] == [
        (0, 2, 0),
        (0, 1, 0),
        (0, 1, 0),
    ]
    assert factories.balance(registry, emp) == 6_000
    assert len(ledger(engine, emp)) == 2


def test_each_kind_of_bad_field_is_rejected_with_line_and_field(harness, registry, tmp_path):
    emp, res, existing = new_id("emp"), new_id("res"), new_id("emp")
    load(harness, tmp_path, {Kind.PARTICIPANTS: [[existing, "EMPLOYEE", "110100"]]})
    used = new_id("k")
    load(harness, tmp_path, {Kind.CREDITS: [[existing, 100, used]]})
    report = load(
        harness,
        tmp_path,
        {
            Kind.PARTICIPANTS: [
                [emp, "EMPLOYEE", "110100"],  # line 2: good
                ["has space", "EMPLOYEE", "110100"],  # 3
                ["", "EMPLOYEE", "110100"],  # 4
                ["x" * 65, "EMPLOYEE", "110100"],  # 5
                [new_id("p"), "RETIRED", "110100"],  # 6
                [new_id("p"), "EMPLOYEE", "1101"],  # 7
                [new_id("p"), "EMPLOYEE", "910100"],  # 8
                [new_id("p"), "EMPLOYEE"],  # 9: too few fields
                [existing, "RESIDENT", "110100"],  # 10: scheme change
                [existing, "EMPLOYEE", "120100"],  # 11: region change
                [res, "RESIDENT", "440300"],  # 12: good
            ],
            Kind.CREDITS: [
                [emp, 500, new_id("k")],  # 2: good
                [emp, -5, new_id("k")],  # 3
                [emp, 0, new_id("k")],  # 4
                [emp, 10_000_000_001, new_id("k")],  # 5
                [emp, "12.50", new_id("k")],  # 6
                [emp, 100, ""],  # 7
                [emp, 100, " padded"],  # 8
                [new_id("nobody"), 100, new_id("k")],  # 9
                [res, 100, new_id("k")],  # 10: a resident has no account
                [existing, 999, used],  # 11: key reused with another body
                [existing, 100, used],  # 12: the same credit again: unchanged
            ],
            Kind.MERCHANTS: [
                [new_id("m"), "BAKERY", "110100", "true", "x"],  # 2
                [new_id("m"), "RETAIL_PHARMACY", "110100", "maybe", "x"],  # 3
                [new_id("m"), "RETAIL_PHARMACY", "110100", "false", "n" * 201],  # 4
                [new_id("m"), "MEDICAL_INSTITUTION", "110100", "1", "Hospital"],  # 5: good
            ],
            Kind.ITEMS: [
                [new_id("i"), "Gauze", "FOOD", "true"],  # 2
                [new_id("i"), "Gauze", "CONSUMABLE", ""],  # 3
                ["bad/code", "Gauze", "CONSUMABLE", "true"],  # 4
                [new_id("i"), "Gauze", "CONSUMABLE", "false"],  # 5: good
            ],
        },
    )
    by_file = {f.kind: (f.loaded, f.unchanged, f.rejected) for f in report.files}
    assert by_file == {
        Kind.PARTICIPANTS: (2, 0, 9),
        Kind.CREDITS: (1, 1, 9),
        Kind.MERCHANTS: (1, 0, 3),
        Kind.ITEMS: (1, 0, 3),
    }
    files = {r.file: r for r in report.rejections}
    assert all(name.endswith(".csv") for name in files)
    found = {(Path(r.file).name.split("-")[0], r.line, r.field) for r in report.rejections}
    assert found == {
        ("participants", 3, "participant_id"),
        ("participants", 4, "participant_id"),
        ("participants", 5, "participant_id"),
        ("participants", 6, "scheme"),
        ("participants", 7, "pooling_region"),
        ("participants", 8, "pooling_region"),
        ("participants", 9, "row"),
        ("participants", 10, "scheme"),
        ("participants", 11, "pooling_region"),
        ("credits", 3, "amount_fen"),
        ("credits", 4, "amount_fen"),
        ("credits", 5, "amount_fen"),
        ("credits", 6, "amount_fen"),
        ("credits", 7, "idempotency_key"),
        ("credits", 8, "idempotency_key"),
        ("credits", 9, "participant_id"),
        ("credits", 10, "participant_id"),
        ("credits", 11, "idempotency_key"),
        ("merchants", 2, "kind"),
        ("merchants", 3, "designated"),
        ("merchants", 4, "name"),
        ("items", 2, "category"),
        ("items", 3, "eligible"),
        ("items", 4, "item_code"),
    }
    why = {(Path(r.file).name.split("-")[0], r.line): r.reason for r in report.rejections}
    assert why[("participants", 10)].startswith("CHANGE_REQUIRES_INSURANCE_EVENT")
    assert why[("credits", 9)].startswith("NOT_FOUND")
    assert why[("credits", 10)].startswith("NO_PERSONAL_ACCOUNT")
    assert why[("credits", 11)].startswith("IDEMPOTENCY_KEY_REUSED")
    assert factories.balance(registry, emp) == 500
    assert factories.balance(registry, existing) == 100


def test_a_file_with_a_wrong_header_is_rejected_whole(harness, tmp_path):
    path = tmp_path / "bad-header.csv"
    path.write_text("participant_id,scheme,region\np1,EMPLOYEE,110100\n")
    with BulkLoader(harness.database_url, stream=io.StringIO()) as loader:
        report = loader.load([(Kind.PARTICIPANTS, path)])
    assert (report.files[0].loaded, report.rejected) == (0, 1)
    only = report.rejections[0]
    assert (only.line, only.field) == (1, "header")
    assert "missing pooling_region" in only.reason and "unknown region" in only.reason


def test_an_unreadable_file_is_reported_and_the_load_goes_on(harness, registry, tmp_path):
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"participant_id,scheme,pooling_region\n\xff\xfe,EMPLOYEE,110100\n")
    emp = new_id("emp")
    good = write(tmp_path, Kind.CREDITS, [])
    people = write(tmp_path, Kind.PARTICIPANTS, [[emp, "EMPLOYEE", "110100"]])
    with BulkLoader(harness.database_url, stream=io.StringIO()) as loader:
        report = loader.load(
            [
                (Kind.CREDITS, good),
                (Kind.PARTICIPANTS, broken),
                (Kind.PARTICIPANTS, people),
                (Kind.ITEMS, tmp_path / "missing.csv"),
            ]
        )
    assert [(f.kind, f.loaded, f.rejected) for f in report.files] == [
        (Kind.PARTICIPANTS, 0, 1),
        (Kind.PARTICIPANTS, 1, 0),
        (Kind.CREDITS, 0, 0),
        (Kind.ITEMS, 0, 1),
    ]
    # the undecodable row at its own line (the file read on: a row, not the file, is refused)
    assert [(r.line, r.field) for r in report.rejections] == [(2, "row"), (0, "file")]
    assert factories.balance(registry, emp) == 0


def test_relationship_rules_are_enforced(harness, registry, relationships, engine, tmp_path):
    holder = factories.employee(registry, balance_fen=10_000)
    other = factories.employee(registry, balance_fen=1_000)
    resident = factories.resident(registry)
    parent = factories.resident(registry)
    already = factories.resident(registry)
    factories.active_relationship(relationships, holder, already)
    ids = [new_id("rel") for _ in range(12)]
    report = load(
        harness,
        tmp_path,
        {
            Kind.RELATIONSHIPS: [
                [ids[0], resident, parent, "CHILD", 0],  # 2: resident holder
                [ids[1], holder, holder, "SPOUSE", 0],  # 3: self-sharing
                [ids[2], holder, already, "PARENT", 0],  # 4: duplicate of an API relationship
                [ids[3], holder, parent, "PARENT", 6_000],  # 5: good
                [ids[4], holder, parent, "PARENT", 0],  # 6: duplicate pair within the file
                [ids[5], holder, resident, "PARENT", 5_000],  # 7: only 4,000 left
                [ids[6], holder, resident, "PARENT", 4_000],  # 8: good, uses the rest
                [ids[7], other, new_id("nobody"), "SIBLING", 0],  # 9: unknown beneficiary
                [ids[8], new_id("nobody"), other, "SIBLING", 0],  # 10: unknown holder
                [ids[9], other, parent, "COUSIN", 0],  # 11: not a relation
                [ids[10], other, parent, "OTHER", 0],  # 12: not allowed by configuration
                [ids[11], other, parent, "SIBLING", -1],  # 13: bad quota
                [ids[3], other, resident, "SIBLING", 0],  # 14: id taken by another relationship
            ]
        },
        allowed_relations=frozenset(Relation) - {Relation.OTHER},
    )
    assert reasons(report).keys() == {
        (2, "holder_id"),
        (3, "beneficiary_id"),
        (4, "beneficiary_id"),
        (6, "beneficiary_id"),
        (7, "quota_fen"),
        (9, "beneficiary_id"),
        (10, "holder_id"),
        (11, "relation"),
        (12, "relation"),
        (13, "quota_fen"),
        (14, "relationship_id"),
    }
    why = reasons(report)
    assert why[(2, "holder_id")].startswith("HOLDER_NOT_EMPLOYEE")
    assert why[(3, "beneficiary_id")].startswith("SELF_SHARING")
    assert why[(4, "beneficiary_id")].startswith("DUPLICATE_RELATIONSHIP")
    assert why[(6, "beneficiary_id")].startswith("DUPLICATE_RELATIONSHIP")
    assert why[(7, "quota_fen")].startswith("INSUFFICIENT_BALANCE")
    assert why[(12, "relation")].startswith("RELATION_NOT_ALLOWED")
    assert why[(14, "relationship_id")].startswith("ALREADY_EXISTS")
    assert report.files[0].loaded == 2
    assert factories.balance(registry, holder) == 0
    assert factories.balance(registry, other) == 1_000
    assert [kind for kind, _, _ in ledger(engine, holder)] == [
        "ACCOUNT_CREDIT",
        "QUOTA_ALLOCATION",
        "QUOTA_ALLOCATION",
    ]


def test_terminated_participant_cannot_be_given_a_relationship(harness, registry, tmp_path):
    holder = factories.employee(registry, balance_fen=1_000)
    beneficiary = factories.resident(registry)
    registry.ReportInsuranceEvent(
        registry_pb2.ReportInsuranceEventRequest(
            participant_id=beneficiary,
            event_type=registry_pb2.INSURANCE_EVENT_TYPE_TERMINATED,
            termination_reason=registry_pb2.TERMINATION_REASON_DEATH,
        ),
        metadata=ADMIN,
    )
    report = load(
        harness, tmp_path, {Kind.RELATIONSHIPS: [[new_id("rel"), holder, beneficiary, "PARENT", 0]]}
    )
    assert [(r.line, r.field, r.reason.split(":")[0]) for r in report.rejections] == [
        (2, "beneficiary_id", "PARTICIPANT_NOT_ACTIVE")
    ]


def test_a_bulk_credit_key_stops_a_second_credit_through_the_api(
    harness, registry, engine, tmp_path
):
    emp, key, later = new_id("emp"), new_id("k"), new_id("k")
    report = load(
        harness,
        tmp_path,
        {
            Kind.PARTICIPANTS: [[emp, "EMPLOYEE", "110100"]],
            Kind.CREDITS: [[emp, 12_345, key], [emp, 1_000, later]],
        },
    )
    assert report.rejected == 0
    request = registry_pb2.CreditPersonalAccountRequest(
        participant_id=emp, amount_fen=12_345, idempotency_key=key
    )
    again = registry.CreditPersonalAccount(request, metadata=ADMIN)
    # The first answer, as the API would have given it: the balance right after that credit.
    assert again.balance_fen == 12_345
    second = registry.CreditPersonalAccount(
        registry_pb2.CreditPersonalAccountRequest(
            participant_id=emp, amount_fen=1_000, idempotency_key=later
        ),
        metadata=ADMIN,
    )
    assert second.balance_fen == 13_345
    assert second.ledger_entry_id > again.ledger_entry_id > 0
    credits = [(kind, amount) for kind, amount, _ in ledger(engine, emp)]
    assert credits == [("ACCOUNT_CREDIT", 12_345), ("ACCOUNT_CREDIT", 1_000)]
    assert factories.balance(registry, emp) == 13_345
    other = registry_pb2.CreditPersonalAccountRequest(
        participant_id=emp, amount_fen=99, idempotency_key=key
    )
    with pytest.raises(grpc.RpcError) as refused:
        registry.CreditPersonalAccount(other, metadata=ADMIN)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert factories.balance(registry, emp) == 13_345


def test_a_loaded_relationship_serves_its_quota_after_reconcile(
    harness, registry, relationships, tmp_path
):
    emp, res, share = new_id("emp"), new_id("res"), new_id("rel")
    load(
        harness,
        tmp_path,
        {
            Kind.PARTICIPANTS: [[emp, "EMPLOYEE", "110100"], [res, "RESIDENT", "440300"]],
            Kind.CREDITS: [[emp, 50_000, new_id("k")]],
            Kind.RELATIONSHIPS: [[share, emp, res, "GRANDPARENT", 20_000]],
        },
    )
    harness.run(reconcile(harness.app.database, harness.app.quotas))
    shown = relationships.GetRelationship(
        relationship_pb2.GetRelationshipRequest(relationship_id=share), metadata=APP
    ).relationship
    assert shown.status == common_pb2.RELATIONSHIP_STATUS_ACTIVE
    assert (shown.allocated_fen, shown.available_fen, shown.held_fen) == (20_000, 20_000, 0)
    assert shown.created_channel == common_pb2.CHANNEL_PROVINCIAL_PLATFORM
    assert factories.balance(registry, emp) == 30_000
    # The relationship works like one made through the API: quota goes back on dissolution.
    relationships.DissolveRelationship(
        relationship_pb2.DissolveRelationshipRequest(
            relationship_id=share, party=common_pb2.PARTY_HOLDER
        ),
        metadata=APP,
    )
    assert factories.balance(registry, emp) == 50_000


def test_twenty_thousand_rows_in_several_batches(harness, registry, engine, tmp_path):
    prefix = new_id("bulk")
    families = 5_000
    employees = [f"{prefix}-e{i}" for i in range(families)]
    residents = [f"{prefix}-r{i}" for i in range(families)]
    report = load(
        harness,
        tmp_path,
        {
            Kind.PARTICIPANTS: [[e, "EMPLOYEE", "110100"] for e in employees]
            + [[r, "RESIDENT", "440300"] for r in residents],
            Kind.CREDITS: [[e, 10_000 + i, f"{prefix}-k{i}"] for i, e in enumerate(employees)],
            Kind.RELATIONSHIPS: [
                [f"{prefix}-s{i}", e, r, "PARENT", 1_000 + i]
                for i, (e, r) in enumerate(zip(employees, residents, strict=True))
            ],
        },
        batch_size=1_500,
    )
    assert report.rejected == 0
    assert sum(f.loaded for f in report.files) == 20_000
    with engine.connect() as connection:
        kinds = dict(
            connection.execute(
                select(LedgerEntryRow.kind, func.sum(LedgerEntryRow.amount_fen))
                .where(LedgerEntryRow.holder_id.like(f"{prefix}-%"))
                .group_by(LedgerEntryRow.kind)
            ).all()
        )
        events = connection.execute(
            select(func.count()).where(RelationshipEventRow.relationship_id.like(f"{prefix}-%"))
        ).scalar()
    credited = sum(10_000 + i for i in range(families))
    allocated = sum(1_000 + i for i in range(families))
    assert kinds == {"ACCOUNT_CREDIT": credited, "QUOTA_ALLOCATION": allocated}
    assert events == 4 * families
    assert factories.balance(registry, employees[4_321]) == 9_000


def test_the_command_loads_and_exits_1_when_a_row_is_rejected(
    harness, registry, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("DATABASE_URL", harness.database_url)
    monkeypatch.setenv("MEDWALLET_DATA_DIR", str(tmp_path / "data"))
    emp = new_id("emp")
    good = write(tmp_path, Kind.PARTICIPANTS, [[emp, "EMPLOYEE", "110100"]])
    credits = write(tmp_path, Kind.CREDITS, [[emp, 700, new_id("k")], [emp, 0, new_id("k")]])
    rejects = tmp_path / "rejects.csv"
    code = main(
        [
            "load-csv",
            "--credits",
            str(credits),
            "--participants",
            str(good),
            "--rejects",
            str(rejects),
        ]
    )
    assert code == 1
    assert factories.balance(registry, emp) == 700
    out = capsys.readouterr()
    assert "1 loaded, 0 unchanged, 1 rejected" in out.out
    assert f"{credits}:3: amount_fen: must be a positive number of fen" in out.err
    lines = list(csv.reader(rejects.open()))
    assert lines == [
        ["file", "line", "field", "reason"],
        [str(credits), "3", "amount_fen", "must be a positive number of fen"],
    ]
    assert main(["load-csv", "--participants", str(good)]) == 0
    assert main(["load-csv"]) == 2


def test_progress_redraws_at_most_ten_times_a_second_and_sums_up() -> None:
    now = [0.0]
    out = io.StringIO()
    with Progress(1_000, "items", stream=out, interactive=True, clock=lambda: now[0]) as progress:
        for _ in range(100):
            now[0] += 0.01
            progress.advance(10)
        progress.note("a message")
    text = out.getvalue()
    draws = text.count("ETA")
    assert 5 <= draws <= 11
    assert "a message\n" in text
    assert text.endswith("items: done: 1,000 rows in 1.0s (1,000 rows/s)\n")
    assert "1,000/1,000 rows" in progress.line()


def test_progress_writes_plain_lines_when_not_on_a_terminal() -> None:
    now = [0.0]
    out = io.StringIO()
    with Progress(None, "scan", unit="pages", stream=out, clock=lambda: now[0]) as progress:
        for _ in range(30):
            now[0] += 1
            progress.advance()
    lines = out.getvalue().splitlines()
    assert lines[:-1] == [f"scan  {n} pages  1.0 pages/s" for n in (10, 20, 30)]
    assert lines[-1] == "scan: done: 30 pages in 30.0s (1.0 pages/s)"


def test_a_row_that_is_not_utf8_is_rejected_at_its_line_and_the_rest_loads(
    harness, registry, tmp_path
):
    """600 credits of 100 fen, a row with a byte that is not UTF-8 (line 602), one credit more;
    batches of 500. Before (an audit's finding): the file was decoded in ~8 KiB chunks, the
    error came at the chunk holding the byte, was reported at a good row hundreds of lines
    earlier, and the batch being gathered (rows 502-601) was neither loaded nor reported; only
    50,000 fen of 60,100 were credited."""
    employee = factories.employee(registry)
    prefix = new_id("k")
    good = [f"{employee},100,{prefix}-{i:04d}" for i in range(600)]
    data = ("participant_id,amount_fen,idempotency_key\n" + "\n".join(good) + "\n").encode()
    data += f"{employee},100,".encode() + b"bad\xff-key\n"  # line 602
    data += f"{employee},100,{prefix}-last\n".encode()  # line 603
    path = tmp_path / "credits-undecodable.csv"
    path.write_bytes(b"\xef\xbb\xbf" + data)  # with a byte order mark, as spreadsheets save
    with BulkLoader(harness.database_url, stream=io.StringIO(), batch_size=500) as loader:
        report = loader.load([(Kind.CREDITS, path)])
    assert reasons(report) == {(602, "row"): "is not UTF-8 text"}
    assert report.files[0].loaded == 601
    assert factories.balance(registry, employee) == 60_100
