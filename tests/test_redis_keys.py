"""Every key name is in storage/redis/keys.py: the Lua scripts build keys of their slot only
with the suffixes keys.SCRIPT_SUFFIXES declares, each the suffix of a Python builder's key."""

from __future__ import annotations

import fnmatch
import re
from importlib import resources

import pytest

from authz_server.storage.redis import keys

pytestmark = pytest.mark.backend_neutral

# A literal that starts with ':' concatenated to something (`prefix .. ':q:' .. rid`).
BUILT_SUFFIX = re.compile(r"\.\.\s*'(:[^']*)'")


def _scripts() -> dict[str, str]:
    folder = resources.files("authz_server.storage.redis").joinpath("lua")
    return {
        entry.name: entry.read_text() for entry in folder.iterdir() if entry.name.endswith(".lua")
    }


def test_scripts_build_only_declared_key_suffixes() -> None:
    undeclared = {
        (name, suffix)
        for name, text in _scripts().items()
        for suffix in BUILT_SUFFIX.findall(text)
        if suffix not in keys.SCRIPT_SUFFIXES
    }
    assert not undeclared, f"key suffixes built in Lua but not declared in keys.py: {undeclared}"


def test_the_check_sees_the_scripts_keys() -> None:
    used = {suffix for text in _scripts().values() for suffix in BUILT_SUFFIX.findall(text)}
    assert used == set(keys.SCRIPT_SUFFIXES)  # none declared that no script builds


def test_declared_suffixes_are_the_python_builders() -> None:
    prefix = keys.prefix("beneficiary")
    authorization_id = keys.new_authorization_id("beneficiary")
    built = {
        ":q:": keys.quota("beneficiary", "r1"),
        ":qh:": keys.quota_holds("beneficiary", "r1"),
        ":a:": keys.authorization(authorization_id),
        ":expiry": keys.expiry(prefix),
        ":capturing": keys.capturing(prefix),
        ":g": keys.generation_marker(prefix),
    }
    assert set(built) == set(keys.SCRIPT_SUFFIXES)
    for suffix, key in built.items():
        assert key.startswith(prefix + suffix)
    assert keys.prefix_of_authorization(authorization_id) == prefix


def test_scan_patterns_match_their_keys() -> None:
    prefix = keys.prefix("beneficiary")
    match = keys.SLOT_ZSET.fullmatch(keys.capturing(prefix))
    assert match is not None and match.groups() == (prefix, "capturing")
    match = keys.SLOT_ZSET.fullmatch(keys.expiry(prefix))
    assert match is not None and match.groups() == (prefix, "expiry")
    assert keys.SLOT_ZSET.fullmatch(keys.quota_index("beneficiary")) is None
    # Redis's glob reads these patterns as fnmatch does ({ and } are plain characters)
    assert fnmatch.fnmatchcase(keys.expiry(prefix), keys.SLOT_ZSETS)
    assert fnmatch.fnmatchcase(keys.capturing(prefix), keys.SLOT_ZSETS)
    assert fnmatch.fnmatchcase(keys.capturing(prefix), keys.slot_zsets_of_kind("capturing"))
    assert fnmatch.fnmatchcase(keys.generation_marker(prefix), keys.GENERATION_MARKS)
    assert fnmatch.fnmatchcase(keys.idempotency("b", "m", "k"), keys.IDEMPOTENCY_RECORDS)
    assert fnmatch.fnmatchcase(keys.idempotency_claim("m", "k"), keys.IDEMPOTENCY_CLAIMS)
    assert fnmatch.fnmatchcase(keys.quota("b", "r"), keys.ALL_KEYS)


def test_authorization_ids_are_unique_across_draws_and_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    count = keys.AUTHORIZATION_IDS_PER_DRAW * 3 + 7  # several draws of the pool, one partial

    def many(_: int) -> list[str]:
        return [keys.new_authorization_id("beneficiary") for _ in range(count)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = [one for batch in pool.map(many, range(4)) for one in batch]
    assert len(set(ids)) == len(ids) == 4 * count
    prefix_digits = keys.tag_digest("beneficiary")
    assert all(re.fullmatch(prefix_digits + "[0-9a-f]{24}", one) for one in ids)


def test_a_forked_child_draws_its_own_authorization_ids() -> None:
    """Workers are processes: a child must not hand out the ids left in its parent's pool."""
    import os

    keys.new_authorization_id("beneficiary")  # the pool now holds ids the parent will use
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        os.write(writing, keys.new_authorization_id("beneficiary").encode())
        os._exit(0)
    os.close(writing)
    _, status = os.waitpid(child, 0)
    from_child = os.read(reading, 64).decode()
    os.close(reading)
    assert status == 0
    assert len(from_child) == 32
    parents_next = [
        keys.new_authorization_id("beneficiary") for _ in range(keys.AUTHORIZATION_IDS_PER_DRAW)
    ]
    assert from_child not in parents_next
