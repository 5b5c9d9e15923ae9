"""The service started with a redis+cluster:// URL (REDIS_URL) on a real 3+3 Redis Cluster
(tests/redis_cluster.py), whatever TEST_REDIS_CLUSTER says: it serves Authorize and Capture for
beneficiaries whose slots live on every primary, its scripts are loaded on every primary, its
hot state's marker names every primary's run id. (A primary replaced by its replica under load:
tests/test_redis_cluster_failover.py.)

Every script runs on the node that owns its slot, and a cluster node refuses a script whose
keys are in two slots (CROSSSLOT): each call that succeeds here proves its script single-slot.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from authz_server.generated.medwallet.v1 import (
    authorization_pb2_grpc,
    registry_pb2_grpc,
    relationship_pb2_grpc,
)
from authz_server.storage.redis import keys, scripts
from authz_server.storage.redis.generation import GlobalMarker
from tests.harness import Harness
from tests.redis_cluster import RedisClusterHarness, cluster_fixture, slot_of
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    Family,
    authorize,
    capture,
    family,
    figures,
    register_merchants,
)

pytestmark = pytest.mark.backend_neutral

redis_cluster = cluster_fixture(name="service_cluster")
# Families until every primary owns at least this many of their slots.
PER_PRIMARY = 2


class Stubs:
    def __init__(self, harness: Harness) -> None:
        self.channel = grpc.insecure_channel(harness.address)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.relationships = relationship_pb2_grpc.RelationshipServiceStub(self.channel)
        self.authorizations = authorization_pb2_grpc.AuthorizationServiceStub(self.channel)


@pytest.fixture(scope="module")
def service(
    service_cluster: RedisClusterHarness, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Harness, Stubs]]:
    harness = Harness(Path(tmp_path_factory.mktemp("on-cluster")), redis_cluster=service_cluster)
    stubs = Stubs(harness)
    register_merchants(stubs.registry)
    yield harness, stubs
    stubs.channel.close()
    harness.close()


def families_on_every_primary(cluster: RedisClusterHarness, stubs: Stubs) -> list[Family]:
    owned: dict[int, int] = dict.fromkeys(cluster.primary_ports(), 0)
    made: list[Family] = []
    while min(owned.values()) < PER_PRIMARY:
        assert len(made) < 60, f"beneficiaries' slots did not reach every primary: {owned}"
        fam = family(stubs.registry, stubs.relationships, 30_000)
        made.append(fam)
        owned[cluster.owner_of_slot(slot_of(keys.prefix(fam.beneficiary_id)))] += 1
    return made


def pay(stubs: Stubs, fam: Family, amount_fen: int) -> None:
    held = authorize(stubs.authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, amount_fen)
    assert held.decision == APPROVED, held
    done = capture(stubs.authorizations, HOSPITAL, held.authorization_id)
    assert done.status == CAPTURED, done


def marker(harness: Harness) -> GlobalMarker:
    found = GlobalMarker.parse(harness.run(harness.client.get(keys.GENERATION)))
    assert found is not None and not found.rebuilding
    return found


def run_ids(cluster: RedisClusterHarness) -> str:
    ports = cluster.primary_ports()
    runs = []
    for port in ports:
        client = cluster.node(port).client()
        replication_id = client.info("replication")["master_replid"]
        runs.append(f"{client.info('server')['run_id']}:{replication_id}")
    return ",".join(sorted(runs))


def test_authorize_and_capture_on_every_primary(service: tuple[Harness, Stubs]) -> None:
    harness, stubs = service
    cluster = harness.redis_cluster
    assert cluster is not None and harness.redis_url.startswith("redis+cluster://")
    for fam in families_on_every_primary(cluster, stubs):
        pay(stubs, fam, 12_000)
        (relationship_id,) = fam.relationship_ids
        assert figures(stubs.relationships, relationship_id) == (18_000, 0, 12_000)
    # Loaded on every primary at start; built in the run of every primary.
    shas = [scripts.script(name).sha for name in scripts.ALL_SCRIPTS]
    for port in cluster.primary_ports():
        assert all(cluster.node(port).command("SCRIPT", "EXISTS", *shas)), port
    assert marker(harness).run_ids == run_ids(cluster)
