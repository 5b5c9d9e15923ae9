"""What runs on every Redis primary rather than by key: SCAN, DBSIZE, SCRIPT LOAD.

PipelinedRedis.primaries() gives one plain connection per primary (a single node: itself); a
cluster client refuses keyless commands through execute/execute_many, so every such command of
the service is sent from here. The keys a scan finds are then read or written through the
client itself (routed by slot), and a command of several keys only ever names keys of one hash
slot (a cluster refuses the others: `by_slot`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Iterable

from redis.crc import key_slot

from authz_server.storage.redis.pipelined import (
    Argument,
    Command,
    PipelinedRedis,
    answered,
    as_integer,
    as_list,
    as_text,
)

# The composite cursor of scan_step: bits 0-7 the node's index, 8-15 how many nodes there were,
# the rest that node's own SCAN cursor.
NODE_BITS = 8
MAX_NODES = (1 << NODE_BITS) - 1


def _scan_command(cursor: int, pattern: str, count: int, kind: str | None) -> tuple[Argument, ...]:
    command: tuple[Argument, ...] = ("SCAN", cursor, "MATCH", pattern, "COUNT", count)
    return (*command, "TYPE", kind) if kind else command


async def _scan_once(
    node: PipelinedRedis, cursor: int, pattern: str, count: int, kind: str | None
) -> tuple[int, list[str]]:
    reply = as_list(await node.execute(*_scan_command(cursor, pattern, count, kind)))
    return as_integer(reply[0]), [as_text(name) for name in as_list(reply[1])]


async def scan_pages(
    redis: PipelinedRedis, pattern: str, count: int, kind: str | None = None
) -> AsyncIterator[list[str]]:
    """Every key matching `pattern` on every primary, a SCAN page at a time (a page may be
    empty). A key may be seen twice (SCAN's own promise), none is missed that stays."""
    for node in await redis.primaries():
        cursor = 0
        while True:
            cursor, names = await _scan_once(node, cursor, pattern, count, kind)
            yield names
            if cursor == 0:
                break


async def scan_step(
    redis: PipelinedRedis, cursor: int, pattern: str, count: int, kind: str | None = None
) -> tuple[int, list[str]]:
    """One SCAN call of a pass over every primary, resumable: `cursor` is 0 to begin and what
    the previous step returned after; 0 is returned once the last primary's scan has ended.
    When the primaries changed since the pass began (their number), it begins again at the
    first: a pass may then see keys twice, or be long, never ends early."""
    nodes = await redis.primaries()
    if len(nodes) > MAX_NODES:
        raise ValueError(f"at most {MAX_NODES} Redis primaries, not {len(nodes)}")
    index, known, node_cursor = _split(cursor)
    if cursor != 0 and (known != len(nodes) or index >= len(nodes)):
        index, node_cursor = 0, 0
    node_cursor, names = await _scan_once(nodes[index], node_cursor, pattern, count, kind)
    if node_cursor == 0:
        index += 1
        if index == len(nodes):
            return 0, names
    return _join(index, len(nodes), node_cursor), names


def _split(cursor: int) -> tuple[int, int, int]:
    mask = (1 << NODE_BITS) - 1
    return cursor & mask, (cursor >> NODE_BITS) & mask, cursor >> (2 * NODE_BITS)


def _join(index: int, nodes: int, node_cursor: int) -> int:
    return (node_cursor << (2 * NODE_BITS)) | (nodes << NODE_BITS) | index


async def keys_in_database(redis: PipelinedRedis) -> int:
    """DBSIZE summed over every primary."""
    return sum([as_integer(await node.execute("DBSIZE")) for node in await redis.primaries()])


async def load_scripts(redis: PipelinedRedis, sources: Iterable[str]) -> None:
    """SCRIPT LOAD of every source on every primary."""
    for node in await redis.primaries():
        for source in sources:
            await node.execute("SCRIPT", "LOAD", source)


def by_slot(names: Iterable[str]) -> list[list[str]]:
    """The names grouped by hash slot: a command of several keys per group is one a cluster
    accepts."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name in names:
        groups[key_slot(name.encode())].append(name)
    return list(groups.values())


async def unlink(redis: PipelinedRedis, names: list[str]) -> int:
    """UNLINK of the names, one command per hash slot, in one pipelined write. How many were
    there."""
    if not names:
        return 0
    commands: list[Command] = [("UNLINK", *group) for group in by_slot(names)]
    return sum(as_integer(answered(reply)) for reply in await redis.execute_many(commands))
