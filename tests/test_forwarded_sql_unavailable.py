"""The ledger writer's medwallet_sql_unavailable_total{kind} reaches its worker's series by kind
(forwarded_metrics.py), through the pickled frame: a labelled counter forwarded."""

from __future__ import annotations

import pickle

from prometheus_client import REGISTRY

from authz_server.ledger.forwarded_metrics import WorkerMetrics, WriterMetrics
from authz_server.observability import metrics


def _value(kind: str) -> float:
    return REGISTRY.get_sample_value("medwallet_sql_unavailable_total", {"kind": kind}) or 0.0


def test_a_labelled_sql_failure_is_forwarded_by_kind() -> None:
    writer = WriterMetrics()
    writer.take()  # what this process counted so far: sent already
    before = {k: _value(k) for k in metrics.SQL_FAILURE_KINDS}
    metrics.sql_unavailable.labels("deadlock").inc()  # the writer's count (this process)
    changes = pickle.loads(pickle.dumps(writer.take()))
    # (only this counter: another thread of this process, the SQLite checkpointer, counts too)
    ours = {k: v for k, v in changes.counters.items() if k[0] == "medwallet_sql_unavailable"}
    assert ours == {("medwallet_sql_unavailable", (("kind", "deadlock"),)): 1.0}
    WorkerMetrics().add(changes)  # the worker's (here the same process: counted twice)
    after = {k: _value(k) for k in metrics.SQL_FAILURE_KINDS}
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"deadlock": 2.0}
