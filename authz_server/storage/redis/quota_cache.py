"""QuotaCache on Redis. Any Redis failure or timeout becomes domain Unavailable."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError, ResponseError

from authz_server.domain.errors import Unavailable
from authz_server.observability import metrics
from authz_server.service.ports import Debit, QuotaFigures, QuotaRestore
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import (
    Argument,
    Command,
    PipelinedRedis,
    Reply,
    as_integer,
    as_list,
    as_text,
)
from authz_server.storage.redis.scripts import script

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
    """The scripts and reads go through the pipelined connection `commands`."""

    def __init__(self, commands: PipelinedRedis) -> None:
        self.commands = commands
        self._credit = script("quota_credit")
        self._debit = script("quota_debit")
        self._dissolve = script("quota_dissolve")
        self._restore = script("quota_restore")

    async def credit(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int, entry_id: int
    ) -> bool:
        return await self._credit_script(beneficiary_id, relationship_id, amount_fen, entry_id, "")

    async def give_back(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int, epoch: str
    ) -> None:
        await self._credit_script(beneficiary_id, relationship_id, amount_fen, "", epoch)

    async def _credit_script(
        self,
        beneficiary_id: str,
        relationship_id: str,
        amount_fen: int,
        entry_id: int | str,
        epoch: str,
    ) -> bool:
        key = keys.quota(beneficiary_id, relationship_id)
        arguments: list[Argument] = [amount_fen, entry_id, epoch]
        result = await guarded(
            lambda: self.commands.evalsha(self._credit, [key], arguments), "quota_credit"
        )
        return as_integer(result) != -1  # -2: counted already by a restore

    async def debit(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int
    ) -> Debit | None:
        key = keys.quota(beneficiary_id, relationship_id)
        result = as_list(
            await guarded(
                lambda: self.commands.evalsha(self._debit, [key], [amount_fen]), "quota_debit"
            )
        )
        available = as_integer(result[0])
        return None if available < 0 else Debit(available, as_text(result[1]))

    async def dissolve(self, beneficiary_id: str, relationship_id: str) -> None:
        quota_keys = [
            keys.quota(beneficiary_id, relationship_id),
            keys.quota_index(beneficiary_id),
        ]
        arguments = [relationship_id, keys.prefix(beneficiary_id)]
        await guarded(
            lambda: self.commands.evalsha(self._dissolve, quota_keys, arguments), "quota_dissolve"
        )

    async def restore(self, quota: QuotaRestore) -> QuotaFigures | None:
        quota_keys = [
            keys.quota(quota.beneficiary_id, quota.relationship_id),
            keys.quota_index(quota.beneficiary_id),
        ]
        arguments: list[Argument] = [
            quota.relationship_id,
            quota.holder_id,
            "ACTIVE" if quota.active else "DISSOLVED",
            quota.unused_fen,
            quota.funding_order,
            quota.beneficiary_id,
            quota.beneficiary_scheme,
            keys.prefix(quota.beneficiary_id),
            quota.ledger_mark,
            os.urandom(8).hex(),  # the quota's new epoch (quota_restore.lua)
        ]
        result = as_list(
            await guarded(
                lambda: self.commands.evalsha(self._restore, quota_keys, arguments),
                "quota_restore",
            )
        )
        if as_integer(result[0]) < 0:
            return None  # BUSY: a capture of the quota is between its phases
        return QuotaFigures(available_fen=as_integer(result[0]), held_fen=as_integer(result[1]))

    async def figures(
        self, beneficiary_id: str, relationship_ids: list[str]
    ) -> dict[str, QuotaFigures]:
        if not relationship_ids:
            return {}
        commands: list[Command] = [
            ("HMGET", keys.quota(beneficiary_id, relationship_id), "available", "held")
            for relationship_id in relationship_ids
        ]
        rows = await guarded(lambda: self._all_answered(commands))
        return {
            relationship_id: QuotaFigures(as_integer(row[0]), as_integer(row[1]))
            for relationship_id, row in zip(relationship_ids, map(as_list, rows), strict=True)
            if row[0] is not None
        }

    async def _all_answered(self, commands: list[Command]) -> list[Reply]:
        """The replies of a pipeline, or its first error reply raised (as redis-py did)."""
        replies = await self.commands.execute_many(commands)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies
