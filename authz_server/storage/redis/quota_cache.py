"""QuotaCache on Redis. Any Redis failure or timeout becomes domain Unavailable."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from authz_server.domain.errors import Unavailable
from authz_server.observability import metrics
from authz_server.service.ports import Debit, QuotaFigures, QuotaRestore
from authz_server.storage.redis import keys
from authz_server.storage.redis.pipelined import (
    Command,
    PipelinedRedis,
    Reply,
    all_answered,
    as_integer,
    as_list,
)
from authz_server.storage.redis.quota_io import (
    QUOTA_ACTIVE,
    QUOTA_FIGURES,
    QUOTA_STATUS,
    QuotaCredit,
    QuotaDebit,
    QuotaDissolve,
    QuotaRestoreCall,
    RestoreRefused,
)
from authz_server.storage.redis.script_io import ScriptCall, run

T = TypeVar("T")
# Tries of a restore that found the quota's money moved between its read and its write.
RESTORE_TRIES = 3


# The histogram's child per script name, looked up once (labels() takes a lock and builds a
# key on every call); the names are the scripts' and the callers' fixed labels, a few dozen.
_SCRIPT_SECONDS: dict[str, Any] = {}


async def guarded(call: Callable[[], Awaitable[T]], script: str = "command") -> T:
    """Runs a Redis call; a timeout or connection error is UNAVAILABLE, never a hang."""
    begin = time.perf_counter()
    try:
        return await call()
    except (RedisError, OSError, TimeoutError) as error:
        raise Unavailable(f"the quota store did not answer: {type(error).__name__}") from error
    finally:
        seconds = _SCRIPT_SECONDS.get(script)
        if seconds is None:
            seconds = _SCRIPT_SECONDS[script] = metrics.redis_script_seconds.labels(script)
        seconds.observe(time.perf_counter() - begin)


class RedisQuotaCache:
    """The scripts and reads, through the pipelined connection `commands`."""

    def __init__(self, commands: PipelinedRedis) -> None:
        self.commands = commands

    async def _run(self, call: ScriptCall[T]) -> T:
        return await guarded(lambda: run(self.commands, call), call.SCRIPT.name)

    async def credit(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int, entry_id: int
    ) -> bool:
        return await self._run(
            QuotaCredit(beneficiary_id, relationship_id, amount_fen, entry_id, "")
        )

    async def give_back(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int, epoch: str
    ) -> None:
        await self._run(QuotaCredit(beneficiary_id, relationship_id, amount_fen, "", epoch))

    async def debit(
        self, beneficiary_id: str, relationship_id: str, amount_fen: int
    ) -> Debit | None:
        return await self._run(QuotaDebit(beneficiary_id, relationship_id, amount_fen))

    async def dissolve(self, beneficiary_id: str, relationship_id: str) -> None:
        await self._run(QuotaDissolve(beneficiary_id, relationship_id))

    async def restore(self, quota: QuotaRestore) -> QuotaFigures | None:
        # The money version first, read under the caller's row lock as the ledger was: should
        # the restore itself reach Redis only after that lock is let go, it changes nothing if
        # the quota's money moved meanwhile (quota_restore.lua). One more round trip, on
        # start-up, reconcile and repair paths only.
        key = keys.quota(quota.beneficiary_id, quota.relationship_id)
        for _ in range(RESTORE_TRIES):
            version = await guarded(lambda: self.commands.execute("HGET", key, "v"))
            # a new epoch: a random token, never one the quota had before
            outcome = await self._run(
                QuotaRestoreCall(
                    quota, os.urandom(8).hex(), 0 if version is None else as_integer(version)
                )
            )
            if outcome is not RestoreRefused.MOVED:
                return None if outcome is RestoreRefused.BUSY else outcome
            # Refused while the caller still holds the lock (it is waiting for this answer):
            # what moved the money since the read was not a commit made after the ledger was
            # read, but the Redis step of one made before (a credit, a capture's finish) or an
            # earlier try of this restore whose reply was lost. The ledger's figure counts it:
            # read the version again and set the quota.
        return None

    async def figures(
        self, beneficiary_id: str, relationship_ids: list[str]
    ) -> dict[str, QuotaFigures]:
        rows = await self._fields(beneficiary_id, relationship_ids, *QUOTA_FIGURES)
        return {
            relationship_id: QuotaFigures(as_integer(row[0]), as_integer(row[1]))
            for relationship_id, row in rows.items()
            if row[0] is not None
        }

    async def still_active(
        self, beneficiary_id: str, relationship_ids: list[str]
    ) -> dict[str, QuotaFigures]:
        rows = await self._fields(beneficiary_id, relationship_ids, QUOTA_STATUS, *QUOTA_FIGURES)
        return {
            relationship_id: QuotaFigures(as_integer(row[1] or 0), as_integer(row[2] or 0))
            for relationship_id, row in rows.items()
            if row[0] == QUOTA_ACTIVE.encode()
        }

    async def _fields(
        self, beneficiary_id: str, relationship_ids: list[str], *fields: str
    ) -> dict[str, list[Reply]]:
        """`fields` of each quota hash (HMGET, one pipelined write), by relationship id."""
        if not relationship_ids:
            return {}
        commands: list[Command] = [
            ("HMGET", keys.quota(beneficiary_id, relationship_id), *fields)
            for relationship_id in relationship_ids
        ]

        async def send() -> list[Reply]:
            return all_answered(await self.commands.execute_many(commands))

        rows = await guarded(send)
        return dict(zip(relationship_ids, map(as_list, rows), strict=True))
