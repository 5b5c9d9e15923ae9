"""The Redis side of dropping records of closed months (service/retention.py), on every
primary: the Authorize idempotency records (keys.idempotency, field cr), the merchant-wide claims
(keys.idempotency_claim, "<digest>|<created ms>") and the settled authorization hashes
(keys.authorization, fields s and cr) created before a cutoff."""

from __future__ import annotations

from collections.abc import Callable

from authz_server.service.ports import HoldStatus
from authz_server.storage.redis import keys, scans
from authz_server.storage.redis.pipelined import Command, PipelinedRedis, Reply, as_text

# Keys per SCAN call.
SCAN_COUNT = 1000


def ignore_count(_looked_at: int) -> None:
    """A `looked_at` that shows nothing."""


async def purge_idempotency_before(
    redis: PipelinedRedis, cutoff_ms: int, looked_at: Callable[[int], None] = ignore_count
) -> int:
    """Deletes the Authorize idempotency records and claims created before `cutoff_ms`, but for
    the records of holds still open (PENDING or CAPTURING: a later purge takes them once they
    have settled). Returns how many; `looked_at` is told how many keys each page looked at (a
    progress bar)."""
    deleted = 0
    async for names in scans.scan_pages(redis, keys.IDEMPOTENCY_RECORDS, SCAN_COUNT):
        looked_at(len(names))
        records = await _each(redis, [("HMGET", name, "cr", "a") for name in names])
        old = [
            (name, _text(record[1]))
            for name, record in zip(names, records, strict=True)
            if isinstance(record, list) and _before(_text(record[0]), cutoff_ms)
        ]
        # Kept while its hold is open (a medical hold lasts a day, past the month's end): a
        # hold whose journal row never committed is journaled by the till's retry replaying
        # it. Dropped, the retry was decided anew and the first hold held the money a second
        # time. Dropped by the next month's purge, once settled.
        holds = [auth_id for _, auth_id in old if auth_id]
        states = await _each(redis, [("HGET", keys.authorization(a), "s") for a in holds])
        still_open = {a for a, state in zip(holds, states, strict=True) if _text(state) in OPEN}
        deleted += await scans.unlink(
            redis, [name for name, auth_id in old if auth_id not in still_open]
        )
    async for names in scans.scan_pages(redis, keys.IDEMPOTENCY_CLAIMS, SCAN_COUNT):
        looked_at(len(names))
        claims = await _each(redis, [("GET", name) for name in names])
        deleted += await scans.unlink(
            redis,
            [
                name
                for name, claim in zip(names, claims, strict=True)
                if claim is not None and _before(as_text(claim).rsplit("|", 1)[1], cutoff_ms)
            ],
        )
    return deleted


# An authorization in one of these states is over: no script reads its hash again (it left the
# quotas' hold sets, the expiry and capturing zsets when it settled), and a late call about it
# is answered from SQL, as after a rebuild (which never writes settled authorizations back).
# Without this purge every decision's hash (~300 B) would stay in Redis for good.
SETTLED = frozenset(
    {HoldStatus.CAPTURED, HoldStatus.VOIDED, HoldStatus.EXPIRED, HoldStatus.DECLINED}
)
# The others still hold money (PENDING, CAPTURING): their Authorize records are kept.
OPEN = frozenset(HoldStatus) - SETTLED


async def purge_settled_authorizations_before(
    redis: PipelinedRedis, cutoff_ms: int, looked_at: Callable[[int], None] = ignore_count
) -> int:
    """Deletes the hashes of authorizations created before `cutoff_ms` and settled (captured,
    voided, expired, declined). Returns how many. A settled state is final, so reading it and
    then deleting is safe without a script."""
    deleted = 0
    async for names in scans.scan_pages(redis, keys.AUTHORIZATIONS, SCAN_COUNT):
        looked_at(len(names))
        states = await _each(redis, [("HMGET", name, "s", "cr") for name in names])
        doomed = []
        for name, state in zip(names, states, strict=True):
            status, created = (
                (_text(part) for part in state) if isinstance(state, list) else (None, None)
            )
            if status in SETTLED and _before(created, cutoff_ms):
                doomed.append(name)
        deleted += await scans.unlink(redis, doomed)
    return deleted


async def _each(redis: PipelinedRedis, commands: list[Command]) -> list[Reply]:
    """One reply per command (read by key: routed by slot), an error reply raised."""
    replies = await redis.execute_many(commands)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _text(reply: Reply) -> str | None:
    return None if reply is None else as_text(reply)


def _before(created_ms: str | None, cutoff_ms: int) -> bool:
    return created_ms is not None and int(created_ms) < cutoff_ms
