"""Where a call's time went during a benchmark phase, from the service's own histograms (their
sums and counts, scraped before and after the phase like loadtest/sql_batches.py): the handler's
time per method, and inside it the limiter's Redis check, each Redis script, the wait for the
journal's commit; per SQL writer the time of one transaction; and how late the event loop ran
its timers. Against the client's latency, it says whether a worker count's slower calls wait on
Redis, on SQL, or behind other callbacks on a saturated event loop (the worker sweep's question:
what stops scaling).

Means over the phase, in ms, per call (per batch for the SQL writers, per probe for the lag).
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# histogram name -> (the label naming its part, or "", the part's prefix in the figures)
HISTOGRAMS: dict[str, tuple[str, str]] = {
    "grpc_server_handling_seconds": ("grpc_method", "handler"),
    "medwallet_rate_limit_check_seconds": ("", "limiter"),
    "medwallet_redis_script_seconds": ("script", "script"),
    "medwallet_journal_wait_seconds": ("", "journal wait"),
    "medwallet_sql_commit_seconds": ("writer", "commit"),
    "medwallet_event_loop_lag_seconds": ("", "loop lag"),
}
# the methods of the benchmark's calls (the others' handlers are left out)
METHODS = ("Authorize", "Capture")

# part ("handler Authorize", "script authorize", "journal wait"...) -> (seconds, count)
Sums = dict[str, tuple[float, float]]


def parse(text: str) -> Sums:
    """The sums and counts of HISTOGRAMS in a /metrics page, by part."""
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        wanted = HISTOGRAMS.get(family.name)
        if wanted is None:
            continue
        label, prefix = wanted
        for sample in family.samples:
            kind = sample.name[len(family.name) :]
            if kind not in ("_sum", "_count"):
                continue
            part = prefix
            if label:
                value = sample.labels.get(label, "")
                if label == "grpc_method" and value not in METHODS:
                    continue
                part = f"{prefix} {value}"
            entry = found.setdefault(part, [0.0, 0.0])
            entry[0 if kind == "_sum" else 1] += sample.value
    return {part: (seconds, count) for part, (seconds, count) in found.items()}


def during(before: Sums, after: Sums) -> dict[str, dict[str, float]]:
    """Per part observed during the phase: its count and mean ms."""
    figures: dict[str, dict[str, float]] = {}
    for part, (seconds, count) in sorted(after.items()):
        was_seconds, was_count = before.get(part, (0.0, 0.0))
        if count > was_count:
            figures[part] = {
                "count": count - was_count,
                "mean_ms": (seconds - was_seconds) / (count - was_count) * 1000,
            }
    return figures


def line(figures: dict[str, dict[str, float]]) -> str:
    """'handler Authorize 21.4 ms, limiter 1.2, script authorize 2.3, journal wait 15.0, ...'"""
    order = ["handler", "limiter", "script", "journal wait", "commit", "loop lag"]

    def rank(part: str) -> tuple[int, str]:
        prefix = next((p for p in order if part.startswith(p)), part)
        return (order.index(prefix) if prefix in order else len(order), part)

    return ", ".join(
        f"{part} {figures[part]['mean_ms']:.2f} ms" for part in sorted(figures, key=rank)
    )
