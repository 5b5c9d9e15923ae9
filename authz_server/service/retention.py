"""Dropping the engine's idempotency records, which is allowed only for closed months.

A record must answer a retry at least until the month of its operation is settled; after that
a retry would be a new payment in a closed month, which settlement cannot take anyway. Dropped:
Authorize records in Redis and Capture/Refund records in SQL created before the end of the
latest closed month. The decision journal (authorizations) and the ledger are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from authz_server.domain.settlement import Month
from authz_server.storage.redis import keys
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import IdempotencyRecordRow, SettlementMonthRow

REDIS_BATCH = 500


@dataclass(frozen=True)
class Purged:
    through_month: str | None
    sql_records: int
    redis_records: int


async def purge_closed_months(database: Database, redis: Redis) -> Purged:
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
    doomed: list[Any] = []
    redis_records = 0
    async for key in redis.scan_iter(match=keys.IDEMPOTENCY_RECORDS, count=1000):
        created: Any = await redis.hget(key, "cr")
        if created is not None and int(created) < cutoff_ms:
            doomed.append(key)
        if len(doomed) >= REDIS_BATCH:
            redis_records += int(await redis.delete(*doomed))
            doomed = []
    async for key in redis.scan_iter(match=keys.IDEMPOTENCY_CLAIMS, count=1000):
        claim: Any = await redis.get(key)  # "<digest>|<created ms>"
        if claim is not None and int(claim.rsplit(b"|", 1)[1]) < cutoff_ms:
            doomed.append(key)
        if len(doomed) >= REDIS_BATCH:
            redis_records += int(await redis.delete(*doomed))
            doomed = []
    if doomed:
        redis_records += int(await redis.delete(*doomed))
    return Purged(last, sql_records, redis_records)
