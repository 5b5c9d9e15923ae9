"""Loads the Lua scripts once; redis-py runs them by EVALSHA and reloads after a Redis restart."""

from __future__ import annotations

from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def load(client: Redis, name: str) -> AsyncScript:
    source = resources.files("authz_server.storage.redis").joinpath(f"lua/{name}.lua").read_text()
    return client.register_script(source)
