"""One server per data directory, and none joining a port another server holds (issue 12).

A second `serve` on a data directory in use started its own private Redis on the first one's
socket (deleting it), and through SO_REUSEPORT silently shared gRPC port 50051: two servers took
payments against two copies of the quotas. Before anything else starts, `serve` now claims:

- the data directory: an advisory lock (flock) on `<data dir>/server.lock`, which says the
  holder's pid. flock, not a pid file alone: the kernel lets it go when its holder dies, so a
  crash leaves nothing to clean up;
- the gRPC port: a lock named after the port (Linux: an abstract unix socket, which lives in
  the network namespace as the port does and goes with its process), then a probe that binds
  the port without SO_REUSEPORT: it fails while any socket listens there, a server of an older
  version or another program included. Only the server's own workers bind it with SO_REUSEPORT,
  after the probe, and the port lock keeps a server starting meanwhile out.

The supervisor holds both for the server's life and hands the same open files to its workers
(spawned: `Claim` pickles as a descriptor passed to the child), so they stay held while any
process of the server lives, e.g. workers left serving after their supervisor was killed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the checks below are skipped
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "server.lock"


class ServeRefused(Exception):
    """Something this server needs is another server's, or its settings contradict each other:
    it must not start (the message says what and whose)."""


class Claim:
    """An open descriptor that holds a claim (a locked file, a bound socket) while it is open;
    pickled for a spawned worker, it passes the descriptor itself (the same open file)."""

    def __init__(self, descriptor: int, what: str) -> None:
        self.descriptor = descriptor
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        return (_claim_in_child, (reduction.DupFd(self.descriptor), self.what))

    def release(self) -> None:
        if self.descriptor >= 0:
            os.close(self.descriptor)
            self.descriptor = -1


def _claim_in_child(descriptor: Any, what: str) -> Claim:
    return Claim(descriptor.detach(), what)


def claim_data_directory(directory: Path) -> Claim | None:
    """Locks `directory` for this server, or raises ServeRefused naming the holder's pid."""
    if fcntl is None:
        return None
    path = directory.resolve() / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise ServeRefused(
            f"data directory {directory.resolve()} is in use by another medwallet-authz server"
            f" (pid {holder}{_gone(holder)}; lock {path}): stop it first, or give this one its"
            " own MEDWALLET_DATA_DIR"
        ) from None
    except BaseException:
        os.close(descriptor)
        raise
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return Claim(descriptor, f"data directory {directory.resolve()}")


def _gone(pid: str) -> str:
    """What to add to a holder's pid that is no longer a process: its workers hold the lock."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return ", exited: its workers still run (fuser names them)"
    except (ValueError, OSError):
        pass  # not a number, or another user's process: it exists
    return ""


def claim_port(host: str, port: int, setting: str) -> Claim | None:
    """Claims a TCP port for this server: raises ServeRefused naming it when another medwallet
    server has it, or anything listens on it. Port 0 (any free port) needs no claim."""
    if port == 0:
        return None
    claim = _port_lock(port, setting)
    try:
        _probe(host, port, setting)
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    return claim


def _port_lock(port: int, setting: str) -> Claim | None:
    if not sys.platform.startswith("linux"):
        return None  # no abstract sockets: the probe alone checks the port
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Per port, whatever the address: a server on 0.0.0.0 and one on 127.0.0.1 would
        # collide on the port too.
        lock.bind(f"\0medwallet-authz/port/{port}")
    except OSError as error:
        lock.close()
        if error.errno == errno.EADDRINUSE:
            raise ServeRefused(
                f"port {port} ({setting}) is held by another medwallet-authz server on this"
                " machine: stop it first, or set another port"
            ) from None
        raise
    return Claim(lock.detach(), f"port {port}")


def _probe(host: str, port: int, setting: str) -> None:
    """Binds the port without SO_REUSEPORT (with SO_REUSEADDR, as gRPC does, so connections of
    a server stopped a moment ago do not count): it fails while any socket listens there."""
    bind_host = host.strip("[]") or None
    try:
        addresses = socket.getaddrinfo(
            bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return  # not resolvable: gRPC's bind says so
    for family, kind, protocol, _name, address in addresses:
        with contextlib.closing(socket.socket(family, kind, protocol)) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ServeRefused(
                        f"port {port} ({setting}, address {host}:{port}) is already in use by"
                        " another process: stop it first, or set another port"
                    ) from None
                # Another failure (an IPv6 address on a host without IPv6): the server's own
                # bind reports what it cannot use.
