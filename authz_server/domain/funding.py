"""Funding: which relationships' quotas pay an authorization, and how much each.

Written as "relationship_id=fen;relationship_id=fen" in funding order wherever it is stored
(Redis authorization hashes and Lua scripts, the SQL journal): this module is that format's one
definition on the Python side (lua/_lib.lua parse_funding is its Lua twin).
"""

from __future__ import annotations

from collections.abc import Iterable

Funding = tuple[tuple[str, int], ...]


def parse_funding(text: str) -> Funding:
    parts = []
    for piece in filter(None, text.split(";")):
        relationship_id, _, amount = piece.partition("=")
        parts.append((relationship_id, int(amount)))
    return tuple(parts)


def format_funding(funding: Iterable[tuple[str, int]]) -> str:
    return ";".join(f"{relationship_id}={amount}" for relationship_id, amount in funding)
