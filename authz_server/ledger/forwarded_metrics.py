"""The ledger writer's metrics, counted by its worker: the writer has no metrics port of its
own (nor a file in the workers' PROMETHEUS_MULTIPROC_DIR: each update through a memory-mapped
file cost it more than the rest of its metrics work), so it sends its worker what changed, and
the worker adds it to the same series an in-process journal and audit trail would
(`medwallet_group_commit_batch_size`, `medwallet_sql_commit_seconds` by writer,
`medwallet_audit_records_total`, ...): SEND_AFTER_BATCH_SECONDS after a batch (so a scrape, or
the benchmark reading the metrics around a phase, sees a batch within ~0.1 s), and every
FORWARD_SECONDS for what changes elsewhere (the SQLite checkpointer's thread). What changed
just before a writer stops or dies is not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from authz_server.observability import metrics

# How often the writer sends its worker what changed, batches or not.
FORWARD_SECONDS = 1.0
# How soon after a batch: the batches of this long go in one send (at most ~20 sends a second).
SEND_AFTER_BATCH_SECONDS = 0.05
# Batch observations kept between two sends (a writer not heard of for a while keeps the first
# ones; its batches are ~10 a second a worker at full load, its counters are never dropped).
MAX_BATCHES_PER_SEND = 10_000

# The counters the writer's journal, audit trail and SQLite checkpointer update.
FORWARDED_COUNTERS: dict[str, Counter] = {
    "medwallet_audit_records": metrics.audit_records,
    "medwallet_audit_dropped": metrics.audit_dropped,
    "medwallet_journal_rejected": metrics.journal_rejected,
    "medwallet_sqlite_checkpoints": metrics.sqlite_checkpoints,
    "medwallet_sql_unavailable": metrics.sql_unavailable,
}

# (counter's family name, its labels as sorted (name, value) pairs) -> its total
CounterKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Changes:
    """What the writer's metrics did since the last send."""

    # (writer name, batch size, commit seconds) of each batch, as BatchObserver takes them
    batches: list[tuple[str, int, float]]
    counters: dict[CounterKey, float]

    def __bool__(self) -> bool:
        return bool(self.batches or self.counters)


def _totals() -> dict[CounterKey, float]:
    totals: dict[CounterKey, float] = {}
    for name, counter in FORWARDED_COUNTERS.items():
        for family in counter.collect():
            for sample in family.samples:
                if sample.name == f"{name}_total":
                    totals[(name, tuple(sorted(sample.labels.items())))] = sample.value
    return totals


@dataclass
class WriterMetrics:
    """The writer's side: its journal's and audit trail's batch observers record here."""

    batches: list[tuple[str, int, float]] = field(default_factory=list)
    sent: dict[CounterKey, float] = field(default_factory=dict)
    # called after each batch observed (the writer schedules a send)
    on_batch: Callable[[], None] | None = None

    def observer(self, writer: str) -> Callable[[int, float], None]:
        def observe(size: int, seconds: float) -> None:
            if len(self.batches) < MAX_BATCHES_PER_SEND:
                self.batches.append((writer, size, seconds))
            if self.on_batch is not None:
                self.on_batch()

        return observe

    def take(self) -> Changes:
        totals = _totals()
        counters = {
            key: total - self.sent.get(key, 0.0)
            for key, total in totals.items()
            if total != self.sent.get(key, 0.0)
        }
        self.sent = totals
        batches, self.batches = self.batches, []
        return Changes(batches, counters)


class WorkerMetrics:
    """The worker's side: adds a writer's changes to its own series."""

    def __init__(self) -> None:
        self.observers: dict[str, metrics.BatchObserver] = {}

    def add(self, changes: Changes) -> None:
        for writer, size, seconds in changes.batches:
            observer = self.observers.get(writer)
            if observer is None:
                observer = self.observers[writer] = metrics.BatchObserver(writer)
            observer(size, seconds)
        for (name, labels), delta in changes.counters.items():
            counter = FORWARDED_COUNTERS.get(name)
            if counter is None or delta <= 0:
                continue  # not one of ours; a counter never goes down
            (counter.labels(**dict(labels)) if labels else counter).inc(delta)
