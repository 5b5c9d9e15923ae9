"""Each SQL writer's batches are counted under its own name (medwallet_group_commit_batch_size
and medwallet_sql_commit_seconds, label writer): the journal of Authorize decisions, the
captures, the refunds' group commit and the audit trail. A worker sweep reads from these which
writer's batches shrink as more processes share the load."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from tests.test_authorization_rules import (
    HOSPITAL,
    MEDICAL,
    authorize,
    capture,
    family,
    refund,
    register_merchants,
    wait_for,
)

# With MEDWALLET_LEDGER_WRITER=process the journal's and the audit trail's batches are the ledger
# writer process's, forwarded to this one (authz_server/ledger/forwarded_metrics.py).
WRITERS = ("journal", "captures", "refunds", "audit")


def _batches(writer: str) -> tuple[float, float, float]:
    """(batches, rows in them, commits timed) of one writer so far."""
    labels = {"writer": writer}
    return (
        REGISTRY.get_sample_value("medwallet_group_commit_batch_size_count", labels) or 0.0,
        REGISTRY.get_sample_value("medwallet_group_commit_batch_size_sum", labels) or 0.0,
        REGISTRY.get_sample_value("medwallet_sql_commit_seconds_count", labels) or 0.0,
    )


def test_each_writer_counts_its_own_batches(
    registry: Any, relationships: Any, authorizations: Any
) -> None:
    register_merchants(registry)
    before = {writer: _batches(writer) for writer in WRITERS}
    fam = family(registry, relationships, 50_000)
    answer = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 30_000)
    capture(authorizations, HOSPITAL, answer.authorization_id, 20_000)
    refund(authorizations, HOSPITAL, answer.authorization_id, 5_000)

    def counted(writer: str) -> bool:
        batches, rows, commits = _batches(writer)
        was = before[writer]
        return batches > was[0] and rows > was[1] and commits > was[2]

    for writer in WRITERS:  # the audit trail writes off the call's path: waited for
        wait_for(lambda writer=writer: counted(writer), seconds=10)  # type: ignore[misc]
    assert (
        REGISTRY.get_sample_value("medwallet_group_commit_batch_size_count", {"writer": "nobody"})
        is None
    )
