"""The Lua scripts: preloaded at start (SCRIPT LOAD), run by EVALSHA, and loaded again by
PipelinedRedis.evalsha after a Redis restart.

Every script begins with lua/_generation.lua (the slot's generation check); a script that uses
the shared functions of lua/_lib.lua gets them prepended too, so each script is still one
self-contained EVAL.
"""

from __future__ import annotations

from importlib import resources

from authz_server.storage.redis.pipelined import PipelinedRedis, Script
from authz_server.storage.redis.scans import load_scripts

ALL_SCRIPTS = (
    "authorize", "authorize_undo", "authorize_forget", "capture_begin", "capture_finish", "void",
    "expire", "quota_credit", "quota_debit", "quota_dissolve", "quota_restore", "hold_restore",
    "capture_clear",
)  # fmt: skip
# Scripts whose keys are not the hot state (no money): the per-principal limits' buckets. They
# skip the generation check; a bucket Redis lost only starts full again.
NOT_HOT_STATE = frozenset({"rate_limit"})
# The rebuild's own, run while it has no generation published (sent by EVAL: see
# storage/redis/rebuild_writer.py).
REBUILD_ONLY = frozenset({"unlink_unless_marked"})
# The smallest scripts need none of the shared functions.
LIBRARY_USERS = frozenset(ALL_SCRIPTS) - {"quota_credit", "quota_debit", "authorize_forget"}


def source(name: str) -> str:
    folder = resources.files("authz_server.storage.redis").joinpath("lua")
    text = folder.joinpath(f"{name}.lua").read_text()
    if name in LIBRARY_USERS:
        text = folder.joinpath("_lib.lua").read_text() + "\n" + text
    if name in NOT_HOT_STATE or name in REBUILD_ONLY:
        return text
    return folder.joinpath("_generation.lua").read_text() + "\n" + text


async def preload(redis: PipelinedRedis) -> None:
    """SCRIPT LOAD every script on every primary, so health turns SERVING only once Redis holds
    them all."""
    await load_scripts(redis, [source(name) for name in ALL_SCRIPTS])


def script(name: str) -> Script:
    return Script(source(name), name)
