"""The Redis side of a rebuild of the hot state from SQL (runtime/rebuild.py): what one page of
beneficiaries looks like in Redis, as plain commands, and the sweep that empties Redis first.
The field names are the scripts' (a quota's: quota_io.quota_fields; an open hold's:
script_io.hold_fields)."""

from __future__ import annotations

import os
from datetime import datetime

from authz_server.domain.hot_state import OpenHold, figures, held_by_quota
from authz_server.service.ports import QuotaRestore
from authz_server.storage.redis import keys, scans
from authz_server.storage.redis.pipelined import Argument, Command, PipelinedRedis
from authz_server.storage.redis.quota_io import quota_fields
from authz_server.storage.redis.script_io import PUT_BACK_SETTLEMENT_BOUND_SECONDS, hold_fields

# Keys per SCAN call while Redis is emptied (its UNLINKs go in one write, one per hash slot).
SCAN_COUNT = 1000


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def page_commands(
    generation: str, quotas: list[QuotaRestore], holds: list[OpenHold], rebuilt_ms: int
) -> list[Command]:
    """Every key of these beneficiaries: each slot's generation mark first (SET ... GET, see
    late_page_marks), then the quotas (figures from the ledger less the open holds) and the
    open holds themselves (rs = 1: put back from SQL).

    Every hold put back is also listed in its slot's capturing zset, scored `rebuilt_ms` (the
    rebuild's time), and its slot in the capture index: a capture claimed in the Redis that was
    lost may commit after SQL was read here, and its process die before finishing the hold.
    Nothing in SQL tells such a hold from the others (a claim lives in Redis only), so all are
    listed; the sweeper settles each as SQL says once STALE_CAPTURE_SECONDS have passed
    (service/capture_recovery.settle_capture), and until then, or its bound sb
    (PUT_BACK_SETTLEMENT_BOUND_SECONDS), expiry does not release it (lua/_lib.lua
    awaiting_settlement). It costs one ZADD per slot with holds, and one per page.

    The marks lead: a page whose write timed out may still reach Redis late, and only a prefix
    of it may (a write cut by the dropped connection): any of its keys that lands has its mark
    with it, so the slot is known to hold an earlier generation's figures (MWSTALE: the hot state
    is rebuilt; storage/redis/generation.py). Nothing decides on the marks before the data is
    written: the generation is published after the last page."""
    commands: list[Command] = []
    held = held_by_quota(holds)
    epoch = os.urandom(8).hex()
    prefixes: set[str] = set()
    for quota in quotas:
        key = keys.quota(quota.beneficiary_id, quota.relationship_id)
        prefixes.add(keys.prefix(quota.beneficiary_id))
        if quota.active:
            quota_figures = figures(quota.unused_fen, held.get(quota.relationship_id, 0))
            commands.append(("HSET", key, *quota_fields(quota, quota_figures, epoch)))
            commands.append(
                ("ZADD", keys.quota_index(quota.beneficiary_id), quota.funding_order,
                 quota.relationship_id)
            )  # fmt: skip
        else:
            commands.append(("HSET", key, *quota_fields(quota, None, epoch)))
    settle_by_ms = rebuilt_ms + PUT_BACK_SETTLEMENT_BOUND_SECONDS * 1000
    awaiting: dict[str, list[Argument]] = {}  # slot prefix -> its capturing zset's ZADD pairs
    for hold in holds:
        prefix = keys.prefix(hold.beneficiary_id)
        prefixes.add(prefix)
        expires_ms = _ms(hold.expires_at)
        commands.append(
            ("HSET", keys.authorization(hold.authorization_id), *hold_fields(hold, settle_by_ms))
        )
        commands.append(("ZADD", keys.expiry(prefix), expires_ms, hold.authorization_id))
        commands.append(("ZADD", keys.DUE_HOLDS, "LT", expires_ms, prefix))
        for relationship_id, _ in hold.funding:
            commands.append(
                ("SADD", keys.quota_holds(hold.beneficiary_id, relationship_id),
                 hold.authorization_id)
            )  # fmt: skip
        awaiting.setdefault(prefix, []).extend((rebuilt_ms, hold.authorization_id))
    for prefix, pairs in awaiting.items():
        commands.append(("ZADD", keys.capturing(prefix), *pairs))
    if awaiting:
        # After the zsets (the router keeps a call's order): a sweeper that reads the index
        # finds the holds listed. LT: never later than an entry already there.
        pairs = [argument for prefix in awaiting for argument in (rebuilt_ms, prefix)]
        commands.append(("ZADD", keys.CAPTURES_BEGUN, "LT", *pairs))
    marks: list[Command] = [
        ("SET", keys.generation_marker(prefix), generation, "GET") for prefix in sorted(prefixes)
    ]
    return [*marks, *commands]


def late_page_marks(generation: str, commands: list[Command], replies: list[object]) -> list[str]:
    """The slots of a page written by page_commands that had another generation's mark: the
    rebuild swept every mark before its first page, so such a mark is an earlier rebuild's page
    that reached Redis late (or a server's lazy mark of an unused slot racing the sweep), and
    that slot may hold figures read from SQL before money moved. Its own mark is no sign: two
    beneficiaries in different pages may share a slot's tag (a 32-bit digest: at 100,000
    beneficiaries some pairs do)."""
    ours = generation.encode()
    return [
        str(command[1])
        for command, reply in zip(commands, replies, strict=True)
        if command[0] == "SET" and command[-1] == "GET" and reply not in (None, ours)
    ]


def witness_commands(value: str, *, only_existing: bool = False) -> list[Command]:
    """Every hash slot's witness (keys.witness) set to `value`, in slot order (on a Redis
    Cluster a node serves ranges of slots: few runs, one per node and range). With
    `only_existing`, only where a witness is still there (SET XX): a node that lost its data
    since the first write keeps none."""
    tail: tuple[str, ...] = ("XX",) if only_existing else ()
    return [("SET", keys.witness(slot), value, *tail) for slot in range(keys.HASH_SLOTS)]


async def delete_hot_state(redis: PipelinedRedis) -> int:
    """Deletes every key of the hot state but the generation's own. Returns how many. The
    slots' generation marks go first: a script that runs while the rest is being deleted finds
    its slot unmarked and refuses, rather than deciding on a slot half gone (a quota deleted, its
    mark not yet: RELATIONSHIP_NOT_FOUND for a funded family). The witnesses (keys.witness)
    go with the rest: "mw:*" but keys.GENERATION's slot."""
    marks = await _delete_matching(redis, keys.GENERATION_MARKS)
    return marks + await _delete_matching(redis, keys.ALL_KEYS)


async def _delete_matching(redis: PipelinedRedis, pattern: str) -> int:
    """UNLINK of every key matching `pattern` on every primary (keys.GENERATION kept)."""
    deleted = 0
    async for names in scans.scan_pages(redis, pattern, SCAN_COUNT):
        doomed = [name for name in names if not name.startswith(keys.GENERATION)]
        deleted += await scans.unlink(redis, doomed)
    return deleted
