"""The service on a real Redis Cluster (3 primaries, 3 replicas) while a primary fails over and
while slots are resharded, each under load: 16 callers authorize, capture and retry across 50
families spread over every shard (issue 13).

Failover: one primary killed with -9 (no shutdown, so no last writes reach its replica); the
cluster promotes its replica by itself (cluster-node-timeout 1 s here). The server notices a
primary whose run id is not the one its hot state was built on, rebuilds Redis from SQL (as after
any loss: runtime/hot_state.py) and serves again. Printed and asserted, as for a single Redis
lost (tests/test_redis_loss.py): no business decline caused by the fault, no approved hold lost,
no retried key given a new decision, SQL never over quota, Redis equal to SQL at the end; and the
longest UNAVAILABLE window.

Resharding: `redis-cli --cluster reshard` moves a third of one primary's slots to another while
the callers run, once with each slot's keys in one MIGRATE (`--cluster-pipeline` above the keys
of any slot: the recipe in deploy/redis/CLUSTER.md) and once with redis-cli's default of 10 keys
a MIGRATE. A script touches keys it does not name (a beneficiary's quotas); the cluster only
keeps a script off a half-moved slot for the keys it names, so each script reads every key it
may write before its first write (lua/_lib.lua `touch`), and the router never follows ASK for a
script: a half-moved slot costs UNAVAILABLE answers, never money.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from authz_server.storage.redis import keys
from tests.harness import Harness
from tests.redis_cluster import HOST, RedisClusterHarness, running_cluster, slot_of
from tests.test_redis_loss import check, make_families, run_with_fault
from tests.test_redis_loss import stubs as stubs  # the same fixture, on this module's `lossy`

pytestmark = [pytest.mark.slow, pytest.mark.backend_neutral]

# Keys one MIGRATE may carry when a slot moves: far above what any slot holds in this test.
MIGRATE_KEYS_PER_SLOT = 100_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterHarness]:
    with running_cluster(tmp_path_factory.mktemp("failover-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def lossy(
    cluster: RedisClusterHarness, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    seeds = ",".join(f"{HOST}:{port}" for port in cluster.primary_ports())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TEST_REDIS_URL", f"redis+cluster://{seeds}")
        harness = Harness(tmp_path_factory.mktemp("cluster-failover"))
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def families(stubs: Any, cluster: RedisClusterHarness) -> list[tuple[str, str]]:
    """(beneficiary, relationship) pairs, one quota each, on every primary."""
    made = make_families(stubs)
    shards = Counter(shard_of(cluster, beneficiary) for beneficiary, _ in made)
    assert len(shards) == len(cluster.primary_ports()), shards  # every shard has families
    return made


def shard_of(cluster: RedisClusterHarness, beneficiary_id: str) -> int:
    """The port of the primary that holds this beneficiary's keys."""
    return cluster.owner_of_slot(slot_of(keys.prefix(beneficiary_id)))


def busiest_primary(cluster: RedisClusterHarness, families: list[tuple[str, str]]) -> int:
    shards = Counter(shard_of(cluster, beneficiary) for beneficiary, _ in families)
    return shards.most_common(1)[0][0]


def test_a_primary_killed_under_load_fails_over_and_loses_nothing(
    lossy: Harness, stubs: Any, families: list[tuple[str, str]], cluster: RedisClusterHarness
) -> None:
    victim = busiest_primary(cluster, families)
    rebuilt_before = lossy.app.guardian.last_rebuild
    promoted: list[int] = []

    def kill_primary() -> None:
        cluster.kill_primary(victim)
        promoted.append(cluster.wait_for_promotion(victim))

    tally, before, recovery = run_with_fault(lossy, stubs, families, kill_primary)
    check(lossy, stubs, f"primary {victim} killed -9, replica promoted", tally, before, recovery)
    assert promoted and promoted[0] != victim
    assert tally.unavailable > 0  # the failover was felt
    # The promoted replica is a Redis the hot state was not built on: rebuilt from SQL.
    assert lossy.app.guardian.last_rebuild is not rebuilt_before
    cluster.restart(victim)  # back as a replica, for the next test


@pytest.mark.parametrize("keys_per_migrate", [MIGRATE_KEYS_PER_SLOT, 10])
def test_resharding_under_load_loses_nothing(
    lossy: Harness,
    stubs: Any,
    families: list[tuple[str, str]],
    cluster: RedisClusterHarness,
    keys_per_migrate: int,
) -> None:
    """With each slot's keys in one MIGRATE (the recipe), and with redis-cli's default of 10
    keys a MIGRATE: a script on a slot half moved is refused before it writes (it touches every
    key it may write first: lua/_lib.lua `touch`; the router does not follow ASK for a script),
    so the default costs UNAVAILABLE answers, never money."""
    source = busiest_primary(cluster, families)
    target = next(port for port in cluster.primary_ports() if port != source)
    slots = sum(last - first + 1 for first, last in cluster.slots_of(source))
    moving = slots // 3
    moved_families = []

    def reshard() -> None:
        before = {beneficiary: shard_of(cluster, beneficiary) for beneficiary, _ in families}
        cluster.reshard_with_redis_cli(source, target, moving, pipeline=keys_per_migrate)
        moved_families.extend(
            beneficiary
            for beneficiary, port in before.items()
            if shard_of(cluster, beneficiary) != port
        )

    tally, before, recovery = run_with_fault(lossy, stubs, families, reshard)
    name = f"{moving} slots resharded {source} -> {target}, {keys_per_migrate} keys a MIGRATE"
    check(lossy, stubs, name, tally, before, recovery)
    print(f"families whose keys moved: {len(moved_families)}")
    assert moved_families  # the reshard moved some families' keys while they were paying
