"""The Redis side of dropping idempotency records of closed months (service/retention.py): the
Authorize records (keys.idempotency, field cr) and the merchant-wide claims
(keys.idempotency_claim, "<digest>|<created ms>") created before a cutoff, on every primary."""

from __future__ import annotations

from authz_server.storage.redis import keys, scans
from authz_server.storage.redis.pipelined import Command, PipelinedRedis, Reply, as_text

# Keys per SCAN call.
SCAN_COUNT = 1000


async def purge_idempotency_before(redis: PipelinedRedis, cutoff_ms: int) -> int:
    """Deletes the Authorize idempotency records and claims created before `cutoff_ms`. Returns
    how many."""
    deleted = 0
    async for names in scans.scan_pages(redis, keys.IDEMPOTENCY_RECORDS, SCAN_COUNT):
        created = await _each(redis, [("HGET", name, "cr") for name in names])
        deleted += await scans.unlink(
            redis,
            [
                name
                for name, ms in zip(names, created, strict=True)
                if _before(_text(ms), cutoff_ms)
            ],
        )
    async for names in scans.scan_pages(redis, keys.IDEMPOTENCY_CLAIMS, SCAN_COUNT):
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
