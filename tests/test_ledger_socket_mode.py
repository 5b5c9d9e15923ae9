"""The ledger writer's unix socket carries pickles (authz_server/ledger/protocol.py): whoever
connects to it runs code as the service and writes journal rows and audit records of its
choosing. Its protection is its mode, 0600 (protocol.py). That mode must hold from the moment
the socket accepts connections: a connection made before a later chmod stays open after it.
With the process's umask group-writable (002, the default of many distributions' users), the
socket listened 0775 until the chmod, and a local user of the group could connect in between."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from authz_server.ledger import writer
from authz_server.runtime.embedded_redis import EmbeddedRedis
from tests.harness import fresh_database

pytestmark = pytest.mark.backend_neutral


@pytest.mark.parametrize("umask", [0o002, 0o000])
def test_the_writer_socket_is_never_open_to_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int
) -> None:
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    redis_url = redis.start()
    database_url = fresh_database(None, tmp_path)
    socket = tmp_path / "writer.sock"
    modes: list[int] = []
    listening = asyncio.start_unix_server

    class Listened(Exception):
        """Raised once the socket listens: the writer goes no further."""

    async def observed(*args: Any, **kwargs: Any) -> asyncio.AbstractServer:
        server = await listening(*args, **kwargs)
        # the socket accepts connections from here on: its mode now is what a local user meets
        modes.append(stat.S_IMODE(os.stat(socket).st_mode))
        server.close()
        raise Listened

    monkeypatch.setattr(writer.asyncio, "start_unix_server", observed)
    previous = os.umask(umask)
    try:
        with pytest.raises(Listened):
            asyncio.run(asyncio.wait_for(writer.serve(socket, database_url, redis_url, 1.0), 30))
    finally:
        os.umask(previous)
        redis.stop()
    assert modes, "the writer never listened"
    assert modes[0] & 0o077 == 0, f"listening with mode {modes[0]:o}"
