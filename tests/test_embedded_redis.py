"""The private Redis never deletes a socket it does not own (issue 12, point 4): a second start
on a directory whose Redis answers refused nothing and deleted the first one's socket; stopping
it then left the first server's Redis unreachable for every new connection."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import redis

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.runtime.exclusive import ServeRefused

pytestmark = pytest.mark.backend_neutral


def test_a_second_private_redis_refuses_a_socket_a_live_redis_answers_on(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path, persistent=False)
    second = EmbeddedRedis(tmp_path, persistent=False)
    first.start()
    try:
        made = os.lstat(first.socket).st_ino
        with pytest.raises(ServeRefused, match=str(first.socket)):
            second.start()
        second.stop()
        assert os.lstat(first.socket).st_ino == made
        assert redis.Redis(unix_socket_path=str(first.socket)).ping()
    finally:
        first.stop()
    assert not first.socket.exists()  # its own socket is gone with it


def test_a_dead_redis_socket_is_replaced_and_its_owner_removes_no_other(tmp_path: Path) -> None:
    """A redis-server killed outright leaves its socket: the next start takes the path over;
    the stop of the dead one's owner leaves the new socket alone."""
    crashed = EmbeddedRedis(tmp_path, persistent=False)
    crashed.start()
    assert crashed.process is not None
    os.kill(crashed.process.pid, signal.SIGKILL)
    crashed.process.wait(10)
    assert crashed.socket.exists()
    replacement = EmbeddedRedis(tmp_path, persistent=False)
    replacement.start()
    try:
        crashed.stop()
        assert redis.Redis(unix_socket_path=str(replacement.socket)).ping()
    finally:
        replacement.stop()


def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path, persistent=False)
    embedded.socket.write_text("not a socket")
    with pytest.raises(RuntimeError, match="not a socket"):
        embedded.start()
    assert embedded.socket.read_text() == "not a socket"
