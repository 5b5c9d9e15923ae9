"""The TLS front and the process's open-file limit (server/tls_front.py fit_open_file_limit):
each front connection holds 3 files, so a soft limit of 1024 (the usual default in containers)
ran out of files far below the front's own cap, and the process failed with EMFILE all over
(accept, the forwarding connection, SQL, Redis). The front raises the soft limit as far as its
cap needs, and where the hard limit is too low it lowers its cap to what fits and refuses more
connections cleanly. Each case runs a front in a process of its own
(tests/tls_front_fd_child.py), its limits set before it starts: the test's own stay as they
are."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz_server.server.tls_front import FD_HEADROOM, FDS_PER_CONNECTION
from tests.test_tls import Pki

pytestmark = pytest.mark.backend_neutral

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("fd-pki"))


@contextlib.contextmanager
def front_process(
    pki: Pki, soft: int, hard: int, max_connections: int | None = None
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A front in a process whose open-file limits start at soft/hard; yields it and what it
    printed once listening."""

    arguments = [
        sys.executable, "-m", "tests.tls_front_fd_child", str(pki.directory), str(soft), str(hard)
    ]  # fmt: skip
    if max_connections is not None:
        arguments.append(str(max_connections))
    process = subprocess.Popen(
        arguments,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.communicate(timeout=10)[1]
        yield process, json.loads(line)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def report(process: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    """What the front holds now, and everything it logged; the process ends."""
    out, err = process.communicate("report\n", timeout=30)
    return json.loads(out.strip().splitlines()[-1]), err


def tls_client(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pki.ca.certificate_pem.decode())
    directory = pki.directory / "fd-client"
    directory.mkdir(exist_ok=True)
    certificate, key = pki.a.write(directory, "a")
    context.load_cert_chain(certificate, key)
    context.set_alpn_protocols(["h2"])
    return context


def test_a_low_soft_limit_is_raised_as_far_as_the_cap_needs(pki: Pki) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cap = 50
    needed = FDS_PER_CONNECTION * cap + FD_HEADROOM
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"this machine's hard open-file limit is {hard}, under {needed}")
    with front_process(pki, 64, hard, max_connections=cap) as (process, started):
        assert started["soft"] == needed  # raised, as far as needed, not to the hard limit
        assert started["hard"] == hard
        assert started["cap"] == cap
        _held, log = report(process)
    assert "open-file limit raised from 64 to" in log
    assert "fits" not in log  # no warning: the cap fits


def test_a_low_hard_limit_lowers_the_cap_and_an_extra_connection_is_refused(pki: Pki) -> None:
    fitting = 4
    limit = FD_HEADROOM + FDS_PER_CONNECTION * fitting + 1
    with front_process(pki, limit, limit) as (process, started):
        assert started["soft"] == limit and started["hard"] == limit
        assert started["cap"] == fitting
        context = tls_client(pki)
        clients = []
        try:
            for _ in range(fitting):
                raw = socket.create_connection(("127.0.0.1", started["port"]), timeout=10)
                clients.append(context.wrap_socket(raw, server_hostname="localhost"))
            # one more: closed as it arrives, no EMFILE anywhere, the others untouched
            with (
                socket.create_connection(("127.0.0.1", started["port"]), timeout=10) as raw,
                pytest.raises((ssl.SSLError, ConnectionError)),
            ):
                context.wrap_socket(raw, server_hostname="localhost")
            assert process.poll() is None
            held, log = report(process)
        finally:
            for client in clients:
                client.close()
    assert held == {"connections": fitting, "held": fitting}
    assert log.count(f"fits {fitting} connections, not 10000") == 1, log
    assert "LimitNOFILE" in log
    assert f"{fitting} connections open, refusing more" in log
    assert "Too many open files" not in log and "EMFILE" not in log, log
