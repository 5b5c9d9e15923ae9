"""The multiprocess metrics directory as deploy/ gives it: a mount of its own (Kubernetes'
emptyDir in deployment.yaml, compose's tmpfs), named by PROMETHEUS_MULTIPROC_DIR (configmap.yaml,
the Dockerfile). A mount point cannot be removed, so a server with several workers must empty it
rather than remove and make it again. Run in a user and mount namespace of its own (`unshare
-rm`, no privileges needed) with a tmpfs on the directory; skipped where that is not allowed."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.operations.server_process import ServerProcess

# `sh -c SCRIPT DIR STALE server-command...`: mounts a tmpfs on DIR, copies STALE there (a
# worker's file from an earlier run), then execs the server (signals reach it).
MOUNT_THEN_EXEC = 'mount -t tmpfs tmpfs "$0" && cp "$1" "$0/" && shift && exec "$@"'
STALE_CALLS = 4242.0


def _stale_counter_file(folder: Path) -> Path:
    """A worker's counter file as prometheus-client writes it, counting STALE_CALLS Authorize
    calls: left in the directory, it would add them to the scrape."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    labels = ["grpc_type", "grpc_service", "grpc_method", "grpc_code"]
    values = ["unary", "medwallet.v1.AuthorizationService", "Authorize", "OK"]
    path = folder / "counter_999999.db"
    stale = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    key = mmap_key("grpc_server_handled", "grpc_server_handled_total", labels, values, "stale")
    stale.write_value(key, STALE_CALLS, 0.0)  # type: ignore[no-untyped-call]
    stale.close()  # type: ignore[no-untyped-call]
    return path


def _namespace_wrapper(directory: Path, stale: Path) -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) here")
    probe = subprocess.run(
        [unshare, "-rm", "sh", "-c", 'mount -t tmpfs tmpfs "$0"', str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    return [unshare, "-rm", "sh", "-c", MOUNT_THEN_EXEC, str(directory), str(stale)]


def test_two_workers_serve_with_the_metrics_dir_a_mount_point(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (tmp_path / "stale").mkdir()
    stale = _stale_counter_file(tmp_path / "stale")
    server = ServerProcess(
        tmp_path,
        workers=2,
        wrapper=_namespace_wrapper(metrics_dir, stale),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        MEDWALLET_ACCESS_LOG="false",
    )
    try:
        server.wait_serving()
        # SERVING from one worker; the other may still be starting (the gauge is their minimum)
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10
            ) as page:
                text = page.read().decode()
            if "medwallet_health_serving 1.0" in text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "medwallet_health_serving 1.0" in text, text
        assert 'medwallet_build_info{version="0.1.0"} 1.0' in text
        # emptied at start: the earlier run's counts are not added
        assert str(STALE_CALLS) not in text, text
        assert server.stop() == 0, server.output()
    finally:
        server.stop()
