"""What one journal batch costs, by its size: the decision journal (service/journal.py) on a
SQLite file of its own, with nothing else running, so the fixed cost of a transaction (the hop
to the SQL thread and back, BEGIN IMMEDIATE, COMMIT, the hot-state generation read from the
event loop) can be told from the cost of a row.

    python -m loadtest.journal_batch_cost [--sizes 1,9,50] [--rows 2000] [--out DIR]
                                          [--database-url postgresql+psycopg://...]

For each batch size it writes --rows decisions in batches of that size (all awaited together,
so each batch is one transaction) and prints the process's CPU per row and the wall time per
batch; a chart (journal-batch-cost.png) beside journal-batch-cost.json. The benchmark's "SQL
batches" line says which sizes the service makes at each load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from authz_server.runtime.progress import Progress
from authz_server.service.journal import Journal
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import Base

GENERATION = "benchmark-generation"
WARM_UP_BATCHES = 20


def decision(now: datetime) -> dict[str, Any]:
    identifier = uuid.uuid4().hex
    return {
        "authorization_id": identifier,
        "merchant_id": "merchant-benchmark",
        "beneficiary_id": "beneficiary-" + identifier[:6],
        "purpose": "PURPOSE_PHARMACY",
        "decision": "DECISION_APPROVED",
        "decline_reason": None,
        "requested_fen": 3500,
        "approved_fen": 3500,
        "funding": "relationship-benchmark=3500",
        "idempotency_key": identifier,
        "request_digest": "d" * 64,
        "response": b"r" * 115,  # an AuthorizeResponse's size
        "created_at": now,
        "expires_at": now + timedelta(minutes=30),
        "generation": GENERATION,  # a hold: the journal reads the published generation
    }


async def measure(
    directory: Path, batch: int, rows: int, progress: Progress, database_url: str | None = None
) -> dict[str, float]:
    from loadtest.benchmark import drop_schema, sqlite_or_schema

    # a SQLite file of its own, or a private schema of the PostgreSQL database (dropped after)
    url, schema = sqlite_or_schema(database_url, directory, f"journal_{batch}")
    database = Database(url)
    Base.metadata.create_all(database.engine)

    async def published() -> str:  # as the hot state answers while Redis holds its generation
        return GENERATION

    journal = Journal(database, published)
    journal.start()
    now = datetime.now(UTC)
    try:
        for _ in range(WARM_UP_BATCHES):
            await asyncio.gather(*(journal.write(decision(now)) for _ in range(batch)))
        batches = max(1, rows // batch)
        made = [[decision(now) for _ in range(batch)] for _ in range(batches)]
        cpu, wall = time.process_time(), time.perf_counter()
        for rows_of_batch in made:
            await asyncio.gather(*(journal.write(row) for row in rows_of_batch))
            progress.advance(batch)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await journal.stop()
        database.close()
        drop_schema(database_url or "", schema)
    written = batches * batch
    return {
        "batch_rows": batch,
        "rows": written,
        "cpu_us_per_row": cpu / written * 1e6,
        "cpu_us_per_batch": cpu / batches * 1e6,
        "wall_ms_per_batch": wall / batches * 1e3,
    }


def chart(results: list[dict[str, float]], path: Path, database: str = "SQLite") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    labels = [str(int(r["batch_rows"])) for r in results]
    axis.bar(labels, [r["cpu_us_per_row"] for r in results], color="#4878a8")
    axis.set_xlabel("rows per journal batch (one transaction)")
    axis.set_ylabel("CPU µs per row")
    axis.set_title(f"Journal: CPU per decision by batch size ({database})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.journal_batch_cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", default="1,9,50", help="batch sizes, comma-separated")
    parser.add_argument("--rows", type=int, default=2000, help="decisions per batch size")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    parser.add_argument("--database-url", help="PostgreSQL (a private schema); default SQLite")
    arguments = parser.parse_args(argv)
    sizes = [int(size) for size in arguments.sizes.split(",") if size.strip()]
    if not sizes or min(sizes) < 1 or arguments.rows < 1:
        parser.error("--sizes and --rows must be positive")
    results = []
    total = sum(max(1, arguments.rows // size) * size for size in sizes)
    with (
        tempfile.TemporaryDirectory(prefix="mw-journal-cost-") as scratch,
        Progress(total, "journal") as progress,
    ):
        for size in sizes:
            results.append(
                asyncio.run(
                    measure(Path(scratch), size, arguments.rows, progress, arguments.database_url)
                )
            )
    print(f"{'rows/batch':>10} {'CPU µs/row':>11} {'CPU µs/batch':>13} {'wall ms/batch':>14}")
    for r in results:
        print(
            f"{r['batch_rows']:>10.0f} {r['cpu_us_per_row']:>11.1f} {r['cpu_us_per_batch']:>13.0f}"
            f" {r['wall_ms_per_batch']:>14.2f}"
        )
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "journal-batch-cost.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        chart(
            results,
            arguments.out / "journal-batch-cost.png",
            "PostgreSQL" if arguments.database_url else "SQLite",
        )
        print(f"figures and chart in {arguments.out}/journal-batch-cost.json and .png")
    except ImportError as error:
        print(
            f"no chart drawn ({error}); the figures are in {arguments.out}/journal-batch-cost.json"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
