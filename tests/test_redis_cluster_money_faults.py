"""The cluster faults of tests/test_redis_cluster_failover.py under a load that also voids,
captures part of a hold and refunds (tests/test_redis_replica_promoted.py's callers), with the
rolling reconcile on (every shard's quotas paged through while the faults strike): a primary
killed -9 and its replica promoted, then a third of a primary's slots resharded with redis-cli's
default of 10 keys a MIGRATE. After each: no decline, no approval lost, no retry decided anew,
every approval journaled, every capture/refund answered OK in SQL as answered, no voided hold
captured, SQL within quota, Redis equal to SQL. And a primary stopped (SIGSTOP) until its
replica took over, then woken: it runs the scripts queued on its sockets still believing it is
a primary, then learns it was demoted; those late writes go with its resync, and the rebuild
covers them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Harness
from tests.redis_cluster import HOST, RedisClusterHarness, running_cluster
from tests.test_redis_cluster_failover import busiest_primary, shard_of
from tests.test_redis_loss import check, make_families, served_stubs
from tests.test_redis_replica_promoted import assert_told_matches_sql, run_money_load

pytestmark = [pytest.mark.slow, pytest.mark.backend_neutral]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterHarness]:
    with running_cluster(tmp_path_factory.mktemp("money-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def lossy(
    cluster: RedisClusterHarness, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    seeds = ",".join(f"{HOST}:{port}" for port in cluster.primary_ports())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TEST_REDIS_URL", f"redis+cluster://{seeds}")
        harness = Harness(tmp_path_factory.mktemp("cluster-money"), reconcile_quotas_per_second=500)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def stubs(lossy: Harness) -> Iterator[Any]:
    yield from served_stubs(lossy)


@pytest.fixture(scope="module")
def families(stubs: Any) -> list[tuple[str, str]]:
    return make_families(stubs)


def test_a_primary_killed_under_money_load(
    lossy: Harness, stubs: Any, families: Any, cluster: RedisClusterHarness
) -> None:
    victim = busiest_primary(cluster, families)
    rebuilt_before = lossy.app.guardian.last_rebuild

    def kill_primary() -> None:
        cluster.kill_primary(victim)
        cluster.wait_for_promotion(victim)

    tally, before, recovery = run_money_load(lossy, stubs, families, kill_primary)
    check(lossy, stubs, f"primary {victim} killed (money load)", tally, before, recovery)
    assert_told_matches_sql(lossy, tally)
    assert lossy.app.guardian.last_rebuild is not rebuilt_before
    cluster.restart(victim)


def test_resharding_under_money_load(
    lossy: Harness, stubs: Any, families: Any, cluster: RedisClusterHarness
) -> None:
    source = busiest_primary(cluster, families)
    target = next(port for port in cluster.primary_ports() if port != source)
    slots = sum(last - first + 1 for first, last in cluster.slots_of(source))
    moved: list[str] = []

    def reshard() -> None:
        before = {beneficiary: shard_of(cluster, beneficiary) for beneficiary, _ in families}
        cluster.reshard_with_redis_cli(source, target, slots // 3, pipeline=10)
        moved.extend(b for b, port in before.items() if shard_of(cluster, b) != port)

    tally, before, recovery = run_money_load(lossy, stubs, families, reshard)
    check(lossy, stubs, "resharded (money load)", tally, before, recovery)
    assert_told_matches_sql(lossy, tally)
    assert moved  # some families' slots moved while they paid


def test_a_primary_stalled_until_its_replica_took_over_then_woken(
    lossy: Harness, stubs: Any, families: Any, cluster: RedisClusterHarness
) -> None:
    """SIGSTOP a primary under the load until the cluster promotes its replica, then SIGCONT
    it: it wakes still believing it is a primary, runs the scripts queued on its sockets
    (their callers timed out: UNAVAILABLE) and only then learns it was demoted."""
    import os
    import signal
    import time

    victim = busiest_primary(cluster, families)
    node = cluster.node(victim)
    assert node.process is not None
    old_id = node.node_id
    replicas = [
        n
        for n in cluster.nodes
        if n.alive and n.port != victim and cluster._my_line(n)[3] == old_id
    ]
    assert replicas
    rebuilt_before = lossy.app.guardian.last_rebuild

    def stall_until_promoted() -> None:
        os.kill(node.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while not any(cluster.role(r) == "master" for r in replicas):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(node.process.pid, signal.SIGCONT)  # type: ignore[union-attr]

    tally, before, recovery = run_money_load(lossy, stubs, families, stall_until_promoted)
    check(lossy, stubs, f"primary {victim} stalled past its failover", tally, before, recovery)
    assert_told_matches_sql(lossy, tally)
    assert lossy.app.guardian.last_rebuild is not rebuilt_before
