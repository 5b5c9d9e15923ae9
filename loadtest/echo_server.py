"""The floor: a bare grpc.aio AuthorizationService that answers every Authorize and Capture
with a fixed response of the size the real service sends, and does nothing else.

It runs like the service does: the same event loop (`--event-loop`, as MEDWALLET_EVENT_LOOP:
auto, asyncio or uvloop; the benchmark passes the service's), the same server options
(SO_REUSEPORT, the same message bound), and N worker processes spawned on one port. What the
service costs above this is what the service itself does.

    python -m loadtest.echo_server --port 50060 --workers 2 --event-loop uvloop \
        --authorize-response authorize.bin --capture-response capture.bin
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

from authz_server.generated.medwallet.v1 import authorization_pb2, authorization_pb2_grpc
from authz_server.runtime import event_loop
from loadtest.generic_only import GenericOnly
from loadtest.processes import run_workers

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class Echo(authorization_pb2_grpc.AuthorizationServiceServicer):
    def __init__(self, authorize: bytes, capture: bytes) -> None:
        self.authorize = authorization_pb2.AuthorizeResponse.FromString(authorize)
        self.capture = authorization_pb2.CaptureResponse.FromString(capture)

    async def Authorize(
        self, request: authorization_pb2.AuthorizeRequest, context: Any
    ) -> authorization_pb2.AuthorizeResponse:
        return self.authorize

    async def Capture(
        self, request: authorization_pb2.CaptureRequest, context: Any
    ) -> authorization_pb2.CaptureResponse:
        return self.capture


async def serve(port: int, index: int, authorize: bytes, capture: bytes) -> None:
    from grpc_health.v1 import health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(
        Echo(authorize, capture),  # type: ignore[abstract]  # only Authorize and Capture
        GenericOnly(server),  # type: ignore[arg-type]  # as the service adds them
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), GenericOnly(server))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"echo worker {index} serving on port {port} (event loop: {loop_name})", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1)


def worker(port: int, index: int, authorize: bytes, capture: bytes, loop: str = "auto") -> None:
    event_loop.run(serve(port, index, authorize, capture), loop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--authorize-response", type=Path, required=True)
    parser.add_argument("--capture-response", type=Path, required=True)
    parser.add_argument("--event-loop", choices=event_loop.CHOICES, default="auto")
    arguments = parser.parse_args(argv)
    loop = event_loop.resolve(arguments.event_loop)
    authorize = arguments.authorize_response.read_bytes()
    capture = arguments.capture_response.read_bytes()
    if arguments.workers == 1:
        worker(arguments.port, 0, authorize, capture, loop)
        return 0
    return run_workers(
        worker,
        [(arguments.port, index, authorize, capture, loop) for index in range(arguments.workers)],
    )


if __name__ == "__main__":
    sys.exit(main())
