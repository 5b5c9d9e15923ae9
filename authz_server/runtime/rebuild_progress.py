"""How far a rebuild of the hot state has got (runtime/rebuild.py): a province's takes minutes
(loadtest/SIZING.md, limit 6), every payment answered UNAVAILABLE meanwhile, and the on-call
engineer paged after two (deploy/RUNBOOK.md, MedWalletHotStateNotReady) needs to see it move:
the gauges medwallet_hot_state_rebuild_beneficiaries{state="done"|"total"} and a log line every
PROGRESS_LOG_SECONDS with the rate and the time left."""

from __future__ import annotations

import logging
import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from authz_server.observability import metrics
from authz_server.storage.sql.tables import RelationshipRow

log = logging.getLogger(__name__)
# How often a running rebuild logs how far it has got.
PROGRESS_LOG_SECONDS = 10.0


def count_beneficiaries(session: Session) -> int:
    """Beneficiaries with a relationship: what a rebuild's pages go through. A scan of every
    relationship (and PostgreSQL's sort for DISTINCT): beside the pages on PostgreSQL, before
    them on SQLite's one SQL thread (its own cost not measured apart from the rebuild's)."""
    return int(
        session.scalar(select(func.count(func.distinct(RelationshipRow.beneficiary_id)))) or 0
    )


class RebuildProgress:
    """Pages counted as they end; the total once its count (run beside the pages) is known."""

    def __init__(self, generation: str) -> None:
        self.generation = generation
        self.started = self.logged = time.perf_counter()
        self.total: int | None = None
        self.beneficiaries = self.quotas = self.open_holds = 0
        metrics.hot_state_rebuild_beneficiaries.labels(state="done").set(0)
        metrics.hot_state_rebuild_beneficiaries.labels(state="total").set(0)

    def set_total(self, total: int) -> None:
        self.total = total
        metrics.hot_state_rebuild_beneficiaries.labels(state="total").set(total)

    def page_done(self, beneficiaries: int, quotas: int, open_holds: int) -> None:
        self.beneficiaries += beneficiaries
        self.quotas += quotas
        self.open_holds += open_holds
        metrics.hot_state_rebuild_beneficiaries.labels(state="done").set(self.beneficiaries)
        now = time.perf_counter()
        if now - self.logged >= PROGRESS_LOG_SECONDS:
            self.logged = now
            log.warning("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.started
        rate = self.beneficiaries / elapsed if elapsed > 0 else 0.0
        text = (
            f"hot state rebuild {self.generation}: {self.beneficiaries:,} beneficiaries "
            f"({self.quotas:,} quotas, {self.open_holds:,} open holds) in {elapsed:.0f} s, "
            f"{rate:,.0f} beneficiaries/s"
        )
        # A total read beside the pages may be below what they found since (new relationships).
        if self.total and rate > 0 and self.total >= self.beneficiaries:
            left = (self.total - self.beneficiaries) / rate
            share = self.beneficiaries / self.total
            text += f", {share:.0%} of {self.total:,}, about {left:.0f} s left"
        return text
