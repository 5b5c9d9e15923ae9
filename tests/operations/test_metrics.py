"""Real calls move the expected series by the expected amounts; promtool accepts the scrape."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

import grpc
import pytest
from prometheus_client import start_http_server

from authz_server.generated.medwallet.v1 import authorization_pb2, common_pb2
from tests import engine_factories as ef
from tests import factories
from tests.operations.server_process import free_port
from tests.tools import tool


@pytest.fixture(scope="module")
def scrape_url(harness) -> str:
    """The test process serves the harness server's metrics (same process, default registry)."""
    port = free_port()
    start_http_server(port, addr="127.0.0.1")
    return f"http://127.0.0.1:{port}/metrics"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sample value of one series (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if line.startswith(name + " ") and not labels:
            return float(line.split()[-1])
        if all(found.get(k) == v for k, v in labels.items()) and line[len(name)] == "{":
            return float(line.split()[-1])
    return 0.0


def test_calls_move_the_series(scrape_url, registry, relationships, authorizations) -> None:
    ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    holder = factories.employee(registry, balance_fen=100_000)
    parent = factories.resident(registry)
    factories.active_relationship(relationships, holder, parent, 10_000)
    before = scrape(scrape_url)
    approved = authorizations.Authorize(ef.medical(parent, 6_000), metadata=ef.HOSPITAL_TOKEN)
    declined = authorizations.Authorize(ef.medical(parent, 9_000), metadata=ef.HOSPITAL_TOKEN)
    assert declined.decision == authorization_pb2.DECISION_DECLINED
    authorizations.Capture(
        authorization_pb2.CaptureRequest(
            authorization_id=approved.authorization_id, amount_fen=4_000, idempotency_key="m-c"
        ),
        metadata=ef.HOSPITAL_TOKEN,
    )
    with pytest.raises(grpc.RpcError):
        authorizations.Void(
            authorization_pb2.VoidRequest(authorization_id="0" * 32), metadata=ef.HOSPITAL_TOKEN
        )
    after = scrape(scrape_url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Counted a moment after the client has its answer: grpc.aio's abort sends the status
    # before the handler's wrappers (the handled counter) finish; with
    # MEDWALLET_LEDGER_WRITER=process the journal's batches come from the writer within ~0.1 s.
    deadline = time.monotonic() + 10
    while not (
        moved("grpc_server_handled_total", grpc_method="Void", grpc_code="NotFound")
        and moved("medwallet_sql_commit_seconds_count", writer="journal")
    ):
        assert time.monotonic() < deadline, "the Void's or the journal's series never moved"
        time.sleep(0.1)
        after = scrape(scrape_url)

    service, grpc_type = "medwallet.v1.AuthorizationService", "unary"
    assert moved("grpc_server_started_total", grpc_service=service, grpc_method="Authorize") == 2
    assert (
        moved(
            "grpc_server_handled_total",
            grpc_type=grpc_type,
            grpc_service=service,
            grpc_method="Void",
            grpc_code="NotFound",
        )
        == 1
    )
    assert (
        moved(
            "grpc_server_handling_seconds_count",
            grpc_type=grpc_type,
            grpc_service=service,
            grpc_method="Capture",
        )
        == 1
    )
    assert (
        moved(
            "medwallet_authorizations_total",
            purpose="MEDICAL_OUT_OF_POCKET",
            decision="DECLINED",
            decline_reason="INSUFFICIENT_QUOTA",
        )
        == 1
    )
    assert moved("medwallet_approved_amount_fen_total", purpose="MEDICAL_OUT_OF_POCKET") == 6_000
    assert moved("medwallet_captured_amount_fen_total", purpose="MEDICAL_OUT_OF_POCKET") == 4_000
    assert moved("medwallet_redis_script_seconds_count", script="authorize") == 2
    # each SQL writer's batches under its own name
    for writer in ("journal", "captures"):
        assert moved("medwallet_group_commit_batch_size_count", writer=writer) >= 1, writer
        assert moved("medwallet_sql_commit_seconds_count", writer=writer) >= 1, writer
    assert 'le="0.05"' in after  # the latency objective is a bucket boundary


def test_promtool_accepts_a_real_scrape(scrape_url) -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=scrape(scrape_url),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
