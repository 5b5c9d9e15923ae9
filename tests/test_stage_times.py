"""Where a call's time goes: the service's own histograms of the journal wait and the event
loop's lag (observability/loop_lag.py), and the benchmark's reading of them
(loadtest/stage_times.py) from a real /metrics page."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest

from authz_server.generated.medwallet.v1 import authorization_pb2
from authz_server.observability import loop_lag
from loadtest import stage_times
from tests.engine_factories import HOSPITAL_TOKEN, medical

pytestmark = pytest.mark.backend_neutral


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_an_authorize_is_timed_from_its_decision_to_its_commit(harness, authorizations) -> None:
    before = sample("medwallet_journal_wait_seconds_count")
    answer = authorizations.Authorize(medical("nobody-staged", 100), metadata=HOSPITAL_TOKEN)
    assert answer.decision == authorization_pb2.DECISION_DECLINED  # journaled all the same
    assert sample("medwallet_journal_wait_seconds_count") == before + 1


def test_the_serving_loop_is_probed(harness) -> None:
    before = sample("medwallet_event_loop_lag_seconds_count")
    time.sleep(loop_lag.LOOP_LAG_PROBE_SECONDS * 4)
    assert sample("medwallet_event_loop_lag_seconds_count") >= before + 2


def test_a_blocked_loop_shows_as_lag() -> None:
    """A callback that holds the loop 0.2 s: the probe's timer runs that much late."""

    async def scenario() -> float:
        before = sample("medwallet_event_loop_lag_seconds_sum")
        probe = asyncio.get_running_loop().create_task(loop_lag.watch(0.01))
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # the loop is held: no timer can run
        await asyncio.sleep(0.05)
        probe.cancel()
        return sample("medwallet_event_loop_lag_seconds_sum") - before

    assert 0.15 <= asyncio.run(scenario()) < 1.0


def test_the_benchmark_reads_means_per_part_from_a_metrics_page() -> None:
    registry = CollectorRegistry()
    handling = Histogram(
        "grpc_server_handling_seconds", "", ["grpc_type", "grpc_method"], registry=registry
    )
    scripts = Histogram("medwallet_redis_script_seconds", "", ["script"], registry=registry)
    journal = Histogram("medwallet_journal_wait_seconds", "", registry=registry)
    commits = Histogram("medwallet_sql_commit_seconds", "", ["writer"], registry=registry)
    handling.labels("unary", "Authorize").observe(0.010)
    handling.labels("unary", "GetAuthorization").observe(9.0)  # not a benchmark call
    before = stage_times.parse(generate_latest(registry).decode())
    for seconds in (0.020, 0.040):
        handling.labels("unary", "Authorize").observe(seconds)
        scripts.labels("authorize").observe(seconds / 10)
        journal.observe(seconds / 2)
    commits.labels("journal").observe(0.005)
    after = stage_times.parse(generate_latest(registry).decode())
    figures = stage_times.during(before, after)
    assert set(figures) == {
        "handler Authorize", "script authorize", "journal wait", "commit journal"
    }  # fmt: skip
    assert figures["handler Authorize"] == {"count": 2, "mean_ms": pytest.approx(30.0)}
    assert figures["script authorize"]["mean_ms"] == pytest.approx(3.0)
    assert figures["journal wait"]["mean_ms"] == pytest.approx(15.0)
    assert figures["commit journal"] == {"count": 1, "mean_ms": pytest.approx(5.0)}
    assert stage_times.line(figures) == (
        "handler Authorize 30.00 ms, script authorize 3.00 ms, journal wait 15.00 ms,"
        " commit journal 5.00 ms"
    )
