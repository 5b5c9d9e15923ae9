"""Dropping the engine's idempotency records (and Redis's settled authorizations), which is
allowed only for closed months.

A record answers a retry with the first response at least until the month of its operation is
settled. Dropped: Authorize records in Redis and Capture/Refund records in SQL created before
the end of the latest closed month, and the settled authorizations' hashes in Redis (the journal
has them). The decision journal (authorizations) and the ledger are kept. A retry that comes
after the purge (a till retrying minutes after a close at midnight) still pays nothing twice
and is still answered as a retry: an Authorize's key is the journal's unique key, and a
capture's or a refund's key stays on its row in the captures or refunds table
(service/captures.py _capture_without_hold, service/refunds.py _refund_made_under): it
is answered with the authorization as it is now.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from authz_server.domain.settlement import Month
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.retention import (
    ignore_count,
    purge_idempotency_before,
    purge_settled_authorizations_before,
)
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import IdempotencyRecordRow, SettlementMonthRow


@dataclass(frozen=True)
class Purged:
    through_month: str | None
    sql_records: int
    redis_records: int
    # Settled authorization hashes dropped from Redis (SQL's journal keeps the decisions).
    redis_authorizations: int = 0


async def purge_closed_months(
    database: Database, redis: PipelinedRedis, looked_at: Callable[[int], None] = ignore_count
) -> Purged:
    """`looked_at`: told how many Redis keys each page of the scans looked at."""
    last = await database.run(
        lambda session: session.scalar(select(func.max(SettlementMonthRow.month)))
    )
    if last is None:
        return Purged(None, 0, 0)
    cutoff = Month.parse("month", last).ends_at

    def purge_sql(session: Session) -> int:
        result = session.execute(
            delete(IdempotencyRecordRow).where(
                or_(
                    IdempotencyRecordRow.scope.like("capture:%"),
                    IdempotencyRecordRow.scope.like("refund:%"),
                ),
                IdempotencyRecordRow.created_at < cutoff,
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    sql_records = await database.run(purge_sql)
    cutoff_ms = int(cutoff.timestamp() * 1000)
    redis_records = await purge_idempotency_before(redis, cutoff_ms, looked_at)
    authorizations = await purge_settled_authorizations_before(redis, cutoff_ms, looked_at)
    return Purged(last, sql_records, redis_records, authorizations)
