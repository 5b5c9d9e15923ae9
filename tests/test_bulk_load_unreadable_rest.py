"""A CSV file that cannot be read past some row (csv.Error: a field over the csv module's
131,072-character limit) is reported as one rejection at that row, and the load of that file
stops there. The rows read before it must still be loaded (or reported): an audit found the
batch being gathered (here rows 502-601) neither loaded nor reported, so the report showed one
bad row while 100 credits were silently missing from the employee's account (the same fault
the not-UTF-8 row once had: test_bulk_load.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from authz_server.bulk import BulkLoader, Kind
from tests import factories
from tests.harness import Harness, new_id
from tests.test_bulk_load import reasons


def test_rows_before_an_unreadable_row_are_loaded_not_silently_dropped(
    harness: Harness, registry: Any, tmp_path: Path
) -> None:
    employee = factories.employee(registry)
    prefix = new_id("k")
    good = [f"{employee},100,{prefix}-{i:04d}" for i in range(600)]  # lines 2-601
    text = "participant_id,amount_fen,idempotency_key\n" + "\n".join(good) + "\n"
    text += f"{employee},100,{'x' * 200_000}\n"  # line 602: a field the csv module refuses
    text += f"{employee},100,{prefix}-last\n"  # line 603: not read (the file stops at 602)
    path = tmp_path / "credits-oversized-field.csv"
    path.write_text(text)
    with BulkLoader(harness.database_url, stream=io.StringIO(), batch_size=500) as loader:
        report = loader.load([(Kind.CREDITS, path)])
    assert list(reasons(report)) == [(602, "file")]
    file = report.files[0]
    # every row before the unreadable one is accounted for: loaded, unchanged or rejected
    assert (file.loaded, file.unchanged, file.rejected) == (600, 0, 1)
    assert factories.balance(registry, employee) == 60_000


def test_a_row_with_an_unclosed_quote_is_reported_at_the_line_it_starts(
    harness: Harness, registry: Any, tmp_path: Path
) -> None:
    """An unclosed quote makes the csv module read the following lines into that row's last
    field. The row is refused (its key then holds a line break), but was reported at the line
    where it ended (a good row, the last of the file), not at the line with the stray quote,
    so the operator looked at the wrong line and the rows it swallowed were never named."""
    employee = factories.employee(registry)
    prefix = new_id("k")
    text = "participant_id,amount_fen,idempotency_key\n"
    text += f"{employee},100,{prefix}-a\n"  # line 2
    text += f'{employee},100,"{prefix}-b\n'  # line 3: the stray quote
    text += f"{employee},100,{prefix}-c\n"  # line 4: swallowed into line 3's key
    text += f"{employee},100,{prefix}-d\n"  # line 5: swallowed too
    path = tmp_path / "credits-unclosed-quote.csv"
    path.write_text(text)
    with BulkLoader(harness.database_url, stream=io.StringIO()) as loader:
        report = loader.load([(Kind.CREDITS, path)])
    assert [(r.line, r.field) for r in report.rejections] == [(3, "idempotency_key")]
    assert "to line 5" in report.rejections[0].reason
    assert report.files[0].loaded == 1
    assert factories.balance(registry, employee) == 100
