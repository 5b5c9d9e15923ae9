"""Key names. All keys of one beneficiary share the hash tag {b:<beneficiary_id>}."""

from __future__ import annotations


def tag(beneficiary_id: str) -> str:
    return f"mw:{{b:{beneficiary_id}}}"


def quota(beneficiary_id: str, relationship_id: str) -> str:
    """HASH status, available, held, holder, order."""
    return f"{tag(beneficiary_id)}:q:{relationship_id}"


def quota_index(beneficiary_id: str) -> str:
    """ZSET of the beneficiary's active relationship ids, scored by funding order."""
    return f"{tag(beneficiary_id)}:quotas"
