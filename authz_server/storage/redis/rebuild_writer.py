"""The Redis side of a rebuild of the hot state from SQL (runtime/rebuild.py): what one page of
beneficiaries looks like in Redis, as plain commands, and the sweep that empties Redis first.
The field names are the scripts' (a quota's: quota_io.quota_fields; an open hold's:
script_io.hold_fields)."""

from __future__ import annotations

import os
from datetime import datetime

from authz_server.domain.hot_state import OpenHold, figures, held_by_quota
from authz_server.service.ports import QuotaRestore
from authz_server.storage.redis import keys, scans, scripts
from authz_server.storage.redis.pipelined import (
    Argument,
    Command,
    PipelinedRedis,
    answered,
    as_integer,
)
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


def page_writes(commands: list[Command], per_write: int) -> list[list[Command]]:
    """A page of page_commands cut into writes of about `per_write` commands, each led by the
    marks (SET ... GET) of the slots whose keys it writes. A write that times out may still reach
    Redis late, after a later rebuild's sweep, or after its page for those slots: a write after
    the first, without marks of its own, would land unseen (a quota set back to figures read
    before money moved, in a slot the later generation trusts). With its marks it is seen, as
    a late page is (late_page_marks, MWSTALE). The commands keep their order; a slot's mark is
    sent again in each write with its keys (its reply then names this generation, or a late
    page's). A write holds at least one of the page's other commands, so up to twice
    `per_write` when that is 1."""
    marks: dict[str, Command] = {}
    rest: list[Command] = []
    for command in commands:
        if command[0] == "SET" and command[-1] == "GET":
            marks[str(command[1])] = command
        else:
            rest.append(command)
    writes: list[list[Command]] = []
    data: list[Command] = []
    marked: dict[str, Command] = {}  # the marks of the write being filled
    for command in rest:
        name = _mark_of(command)
        mark = marks.get(name)
        needed = 1 if mark is None or name in marked else 2
        if data and len(marked) + len(data) + needed > per_write:
            writes.append([*marked.values(), *data])
            data, marked = [], {}
        if mark is not None:
            marked[name] = mark
        data.append(command)
    if data:
        writes.append([*marked.values(), *data])
    # A mark whose slot has no key here (page_commands writes none such): in the first write.
    used = {_mark_of(command) for command in rest}
    unwritten = [mark for name, mark in marks.items() if name not in used]
    if unwritten:
        writes[:1] = [[*unwritten, *(writes[0] if writes else [])]]
    return writes


def _mark_of(command: Command) -> str:
    """The generation mark of the slot whose key `command` writes ("" for a key of no
    beneficiary slot: keys.DUE_HOLDS, keys.CAPTURES_BEGUN, a witness). Sliced, not matched: a
    page has thousands of commands."""
    if len(command) < 2:
        return ""
    name = command[1]
    text = name.decode() if isinstance(name, bytes) else str(name)
    end = len(_SLOT_PREFIX_START) + keys.TAG_LENGTH
    if text.startswith(_SLOT_PREFIX_START) and text[end : end + 1] == "}":
        return keys.generation_marker(text[: end + 1])
    return ""


_SLOT_PREFIX_START = "mw:{b:"


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
    go with the rest: "mw:*" but keys.GENERATION's slot.

    The rest of a beneficiary slot is deleted only while the slot is still unmarked
    (lua/unlink_unless_marked.lua): a mark there now was written since the first phase, by a
    rebuild that took this one over (its lock expired unnoticed: a process paused, or deletes
    that timed out and reached Redis late). Its keys bear the names this sweep found, and
    deleting them would leave its marked slots without their quotas and holds: a family declined
    on nothing. (Or a late page's mark: its slot is found by this rebuild's page, or by the
    scripts.)"""
    marks = await _delete_matching(redis, keys.GENERATION_MARKS)
    rest = 0
    async for names in scans.scan_pages(redis, keys.ALL_KEYS, SCAN_COUNT):
        rest += await _unlink_unless_marked(redis, _kept_apart(names))
    return marks + rest


# Sent whole (EVAL): the Redis being rebuilt is not trusted yet, and its connection refuses
# EVALSHA, the hot state's scripts (pipelined.py's run gate). Without its comments, which would
# be most of the bytes of the sweep's thousands of calls.
_UNLESS_MARKED = "\n".join(
    line
    for line in scripts.source("unlink_unless_marked").splitlines()
    if not line.startswith("--")
)
# Keys per script call (Lua's unpack has a bound of its own, ~8,000).
_KEYS_PER_UNLINK = 1000


async def _unlink_unless_marked(redis: PipelinedRedis, names: list[str]) -> int:
    """The names deleted, those of a beneficiary slot only while its mark is missing; the
    others (witnesses, indexes) by plain UNLINK. One pipelined write."""
    by_mark: dict[str, list[str]] = {}
    others: list[str] = []
    for name in names:
        mark = _mark_of(("UNLINK", name))
        if not mark:
            others.append(name)
        elif name != mark:
            by_mark.setdefault(mark, []).append(name)
    commands: list[Command] = [("UNLINK", *group) for group in scans.by_slot(others)]
    for mark, group in by_mark.items():
        for start in range(0, len(group), _KEYS_PER_UNLINK):
            chunk = group[start : start + _KEYS_PER_UNLINK]
            commands.append(("EVAL", _UNLESS_MARKED, 1 + len(chunk), mark, *chunk))
    if not commands:
        return 0
    return sum(as_integer(answered(reply)) for reply in await redis.execute_many(commands))


def _kept_apart(names: list[str]) -> list[str]:
    """keys.GENERATION and its lock are never swept."""
    return [name for name in names if not name.startswith(keys.GENERATION)]


async def _delete_matching(redis: PipelinedRedis, pattern: str) -> int:
    """UNLINK of every key matching `pattern` on every primary (keys.GENERATION kept)."""
    deleted = 0
    async for names in scans.scan_pages(redis, pattern, SCAN_COUNT):
        deleted += await scans.unlink(redis, _kept_apart(names))
    return deleted
