"""A TLS front alone in a process of its own, for tests/test_tls_front_fds.py: `python -m
tests.tls_front_fd_child DIRECTORY SOFT HARD [MAX_CONNECTIONS]`, DIRECTORY holding server.crt,
server.key and ca.crt. The process first sets its own open-file limits to SOFT/HARD, as a
container's would be when it starts (set here, not by the parent between fork and exec: that
is unsafe in a parent running gRPC's threads, and a child so started failed in gRPC's poller on
CI). Behind the front a plain listener stands for the gRPC server: it holds every forwarding
connection (3 files per front connection in this process, as in the service). Prints one JSON
line once listening (port, the open-file limits now, the front's cap), then, after a line on
stdin, one with the connections the front holds and those the listener holds."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
import time
from pathlib import Path

from authz_server.server import tls_front
from authz_server.server.tls import ReloadingCertificates


async def main(directory: Path, max_connections: int | None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if max_connections is not None:
        tls_front.MAX_CONNECTIONS = max_connections
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    upstream = await asyncio.start_server(hold, tls_front.PRIVATE_HOST, 0)
    certificates = ReloadingCertificates(
        directory / "server.crt", directory / "server.key", directory / "ca.crt"
    )
    front = tls_front.TlsFront(certificates)
    port = await front.start("127.0.0.1", 0, int(upstream.sockets[0].getsockname()[1]))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = front.connection_cap()
    print(json.dumps({"port": port, "soft": soft, "hard": hard, "cap": cap}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    deadline = time.monotonic() + 5  # the last forwarding connections being made
    while len(held) < len(front.connections) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    print(json.dumps({"connections": len(front.connections), "held": len(held)}), flush=True)
    await front.close()
    upstream.close()


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[3])))
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[4]) if len(sys.argv) > 4 else None))
