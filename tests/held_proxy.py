"""A TCP proxy in front of a real redis-server that can hold back what one client sends: the
network's late delivery, made on purpose. While `holding`, a connection's bytes from the first
chunk that contains `marker` on are kept back (in order) and sent only on `release()`, even when
the client has given up and closed its end meanwhile: as a command already on the wire reaches
Redis after its sender timed out. Replies flow as they come."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CHUNK_BYTES = 65_536


@dataclass
class _Link:
    client: socket.socket
    upstream: socket.socket
    held: list[bytes] = field(default_factory=list)
    pumps: list[threading.Thread] = field(default_factory=list)


class HeldProxy:
    def __init__(self, redis_url: str, marker: bytes) -> None:
        """`redis_url`: the redis-server's, unix:// (the harness's own) or redis://."""
        self.upstream = urlsplit(redis_url)
        self.marker = marker
        self.holding = False
        self.chunks_held = 0  # chunks kept back since the start, for the test to check
        self._released = threading.Event()
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def release(self, timeout_seconds: float = 10.0) -> None:
        """Sends what was held, and waits until Redis has run it: the links that held
        something were closed by their client (it gave up), so Redis closes them after."""
        self.holding = False
        self._released.set()
        with self._lock:
            pumps = [pump for link in self._links if link.held for pump in link.pumps]
        for pump in pumps:
            pump.join(timeout_seconds)
            assert not pump.is_alive(), "a held link was not answered and closed"

    def close(self) -> None:
        self._released.set()
        with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(5)
        with self._lock:
            links = list(self._links)
        for link in links:
            for end in (link.client, link.upstream):
                end.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = self._connect_upstream()
            link = _Link(client, upstream)
            link.pumps = [
                threading.Thread(target=self._forward, args=(link,), daemon=True),
                threading.Thread(target=self._backward, args=(link,), daemon=True),
            ]
            with self._lock:
                self._links.append(link)
            for pump in link.pumps:
                pump.start()

    def _connect_upstream(self) -> socket.socket:
        if self.upstream.scheme == "unix":
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.upstream.path)
            return upstream
        return socket.create_connection((self.upstream.hostname, self.upstream.port or 6379))

    def _forward(self, link: _Link) -> None:
        """Client to Redis; once a chunk is held, the rest of the link is held behind it."""
        seen = b""  # the end of the previous chunk: a marker may straddle two
        try:
            while chunk := link.client.recv(CHUNK_BYTES):
                marked = self.marker in seen + chunk
                seen = chunk[-len(self.marker) :]
                if link.held or (self.holding and marked):
                    link.held.append(chunk)
                    self.chunks_held += 1
                    continue
                link.upstream.sendall(chunk)
        except OSError:
            pass  # the client's end was reset: what was read is still delivered below
        if link.held:
            self._released.wait()
            for chunk in link.held:
                link.upstream.sendall(chunk)
        with contextlib.suppress(OSError):
            link.upstream.shutdown(socket.SHUT_WR)  # Redis answers, then closes its end

    def _backward(self, link: _Link) -> None:
        try:
            while chunk := link.upstream.recv(CHUNK_BYTES):
                # the client gave up: Redis's answers are dropped, as on a network
                with contextlib.suppress(OSError):
                    link.client.sendall(chunk)
        except OSError:
            pass
        link.client.close()
        link.upstream.close()
