"""QuotaCache on Redis. Any Redis failure or timeout becomes domain Unavailable."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from authz_server.domain.errors import Unavailable
from authz_server.observability import metrics
from authz_server.service.ports import QuotaFigures, QuotaRestore
from authz_server.storage.redis import keys
from authz_server.storage.redis.scripts import load

T = TypeVar("T")


async def guarded(call: Callable[[], Awaitable[T]], script: str = "command") -> T:
    """Runs a Redis call; a timeout or connection error is UNAVAILABLE, never a hang."""
    begin = time.perf_counter()
    try:
        return await call()
    except (RedisError, OSError, TimeoutError) as error:
        raise Unavailable(f"the quota store did not answer: {type(error).__name__}") from error
    finally:
        metrics.redis_script_seconds.labels(script).observe(time.perf_counter() - begin)


class RedisQuotaCache:
    def __init__(self, client: Redis) -> None:
        self.client = client
        self._credit = load(client, "quota_credit")
        self._debit = load(client, "quota_debit")
        self._dissolve = load(client, "quota_dissolve")
        self._restore = load(client, "quota_restore")

    async def credit(self, beneficiary_id: str, relationship_id: str, amount_fen: int) -> bool:
        key = keys.quota(beneficiary_id, relationship_id)
        result: Any = await guarded(
            lambda: self._credit(keys=[key], args=[amount_fen]), "quota_credit"
        )
        return int(result) >= 0

    async def debit(self, beneficiary_id: str, relationship_id: str, amount_fen: int) -> int | None:
        key = keys.quota(beneficiary_id, relationship_id)
        result: Any = await guarded(
            lambda: self._debit(keys=[key], args=[amount_fen]), "quota_debit"
        )
        return None if int(result) < 0 else int(result)

    async def dissolve(self, beneficiary_id: str, relationship_id: str) -> None:
        quota_keys = [
            keys.quota(beneficiary_id, relationship_id),
            keys.quota_index(beneficiary_id),
        ]
        arguments = [relationship_id, keys.prefix(beneficiary_id)]
        await guarded(lambda: self._dissolve(keys=quota_keys, args=arguments), "quota_dissolve")

    async def restore(self, quota: QuotaRestore) -> QuotaFigures:
        quota_keys = [
            keys.quota(quota.beneficiary_id, quota.relationship_id),
            keys.quota_index(quota.beneficiary_id),
        ]
        arguments = [
            quota.relationship_id,
            quota.holder_id,
            "ACTIVE" if quota.active else "DISSOLVED",
            quota.unused_fen,
            quota.funding_order,
            quota.beneficiary_id,
            quota.beneficiary_scheme,
            keys.prefix(quota.beneficiary_id),
        ]
        result: Any = await guarded(
            lambda: self._restore(keys=quota_keys, args=arguments), "quota_restore"
        )
        return QuotaFigures(available_fen=int(result[0]), held_fen=int(result[1]))

    async def figures(
        self, beneficiary_id: str, relationship_ids: list[str]
    ) -> dict[str, QuotaFigures]:
        if not relationship_ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for relationship_id in relationship_ids:
                pipe.hmget(keys.quota(beneficiary_id, relationship_id), "available", "held")
            rows: list[Any] = await guarded(pipe.execute)
        return {
            relationship_id: QuotaFigures(int(row[0]), int(row[1]))
            for relationship_id, row in zip(relationship_ids, rows, strict=True)
            if row[0] is not None
        }
