"""What the TLS front costs per call, apart from what a call does (issue 14):

    python -m loadtest.tls_front_cost --calls 20000 --concurrency 16

A gRPC server answering Health.Check (a call that does next to nothing, so the transport's cost
is most of it) is started three ways, alternated REPEATS times: plaintext, gRPC's own mutual TLS
(MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK=handshake) and the service's TLS front with a client CA
(=call, with the front's gate as the service has it). One client process (grpc.aio, one
connection with a client certificate, `--concurrency` calls in flight) makes the calls; the
server process (on the service's event loop: uvloop where installed) CPU time per call is read
from /proc (psutil) around them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from authz_server.runtime import event_loop
from authz_server.runtime.certificates import make_local_set
from authz_server.server.tls import ReloadingCertificates
from authz_server.server.tls_front import PRIVATE_HOST, FrontGate, TlsFront

REPEATS = 3
VARIANTS = ("plaintext", "grpc-tls", "tls-front")


async def serve(variant: str, certificates: Path) -> None:
    """One server, the port on stdout, until stdin closes."""
    files = ReloadingCertificates(
        certificates / "server.crt", certificates / "server.key", certificates / "ca.crt"
    )
    front = TlsFront(files) if variant == "tls-front" else None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    gated: grpc.aio.Server = FrontGate(server, front.peers) if front is not None else server
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, gated)
    if variant == "grpc-tls":
        port = server.add_secure_port("127.0.0.1:0", files.server_credentials())
    else:
        port = server.add_insecure_port(f"{PRIVATE_HOST}:0")
    await server.start()
    if front is not None:
        port = await front.start(PRIVATE_HOST, 0, port)
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    if front is not None:
        await front.close()
    await server.stop(0)


async def calls(port: int, tls: bool, certificates: Path, count: int, concurrency: int) -> None:
    if tls:
        credentials = grpc.ssl_channel_credentials(
            (certificates / "ca.crt").read_bytes(),
            (certificates / "client.key").read_bytes(),
            (certificates / "client.crt").read_bytes(),
        )
        channel = grpc.aio.secure_channel(f"localhost:{port}", credentials)
    else:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        left = [count]

        async def caller() -> None:
            while left[0] > 0:
                left[0] -= 1
                await stub.Check(request, timeout=10)

        await asyncio.gather(*(caller() for _ in range(concurrency)))


def measure(variant: str, certificates: Path, count: int, concurrency: int) -> tuple[float, float]:
    """(calls per second, server CPU µs per call) of one phase."""
    server = subprocess.Popen(
        [sys.executable, "-m", "loadtest.tls_front_cost", "--serve", variant, str(certificates)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        tls = variant != "plaintext"
        asyncio.run(calls(port, tls, certificates, 500, concurrency))  # warm-up
        process = psutil.Process(server.pid)
        before = process.cpu_times()
        started = time.perf_counter()
        asyncio.run(calls(port, tls, certificates, count, concurrency))
        elapsed = time.perf_counter() - started
        after = process.cpu_times()
    finally:
        server.communicate("", timeout=30)
    cpu = (after.user - before.user) + (after.system - before.system)
    return count / elapsed, cpu / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--serve", nargs=2, metavar=("VARIANT", "CERTIFICATES"), help="internal")
    arguments = parser.parse_args(argv)
    if arguments.serve:
        variant, certificates = arguments.serve
        event_loop.run(serve(variant, Path(certificates)), "auto")  # as the service: uvloop
        return 0
    certificates = Path(tempfile.mkdtemp(prefix="mw-tls-front-"))
    make_local_set(certificates, [])
    results: dict[str, list[tuple[float, float]]] = {variant: [] for variant in VARIANTS}
    for _ in range(REPEATS):
        for variant in VARIANTS:
            rate, cpu = measure(variant, certificates, arguments.calls, arguments.concurrency)
            results[variant].append((rate, cpu))
            print(f"{variant:<10} {rate:8.0f} calls/s {cpu:7.1f} server µs/call", flush=True)
    base_rate = statistics.median(rate for rate, _ in results["plaintext"])
    base_cpu = statistics.median(cpu for _, cpu in results["plaintext"])
    print("\nmedian of the repeats (ratios to plaintext):")
    for variant, runs in results.items():
        rate = statistics.median(rate for rate, _ in runs)
        cpu = statistics.median(cpu for _, cpu in runs)
        print(
            f"{variant:<10} {rate:8.0f} calls/s x{rate / base_rate:.2f}  {cpu:7.1f} server µs/call"
            f" x{cpu / base_cpu:.2f} (+{cpu - base_cpu:.0f} µs)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
