"""The service's SQL batches during a benchmark phase, from its own metrics: per writer
(journal, captures, refunds, audit; authz_server/observability/metrics.py), how many batched
transactions it committed and how many rows they held. A worker sweep shows with it whether a
writer's batches shrink as more processes share the load (each commit costs about the same, so a
smaller batch costs more per row).

The service is started with a metrics port (MEDWALLET_METRICS_PORT) and scraped before and after
each phase: two HTTP GETs a phase, on the supervisor process when there are several workers.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

BATCH_SIZE = "medwallet_group_commit_batch_size"
SCRAPE_TIMEOUT_SECONDS = 5.0

# writer -> (batches, rows)
Counts = dict[str, tuple[float, float]]


def fetch(port: int) -> str:
    """The /metrics page of the service whose metrics are on `port` ("" if it does not answer:
    the figures are left out, the phase is not failed)."""
    if not port:
        return ""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_SECONDS
        ) as answer:
            return str(answer.read().decode())
    except OSError:
        return ""


def parse(text: str) -> Counts:
    counts: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != BATCH_SIZE:
            continue
        for sample in family.samples:
            writer = sample.labels.get("writer")
            if writer is None:
                continue
            entry = counts.setdefault(writer, [0.0, 0.0])
            if sample.name == f"{BATCH_SIZE}_count":
                entry[0] += sample.value
            elif sample.name == f"{BATCH_SIZE}_sum":
                entry[1] += sample.value
    return {writer: (batches, rows) for writer, (batches, rows) in counts.items()}


def during(before: Counts, after: Counts) -> dict[str, dict[str, float]]:
    """Per writer that committed during the phase: batches, rows and rows per batch."""
    found: dict[str, dict[str, float]] = {}
    for writer, (batches, rows) in sorted(after.items()):
        was_batches, was_rows = before.get(writer, (0.0, 0.0))
        if batches > was_batches:
            found[writer] = {
                "batches": batches - was_batches,
                "rows": rows - was_rows,
                "rows_per_batch": (rows - was_rows) / (batches - was_batches),
            }
    return found


def line(batches: dict[str, dict[str, float]]) -> str:
    """'journal 9.2 rows x 540, captures 4.1 rows x 300'"""
    return ", ".join(
        f"{writer} {figures['rows_per_batch']:.1f} rows x {figures['batches']:,.0f}"
        for writer, figures in batches.items()
    )
