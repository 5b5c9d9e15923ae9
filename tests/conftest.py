"""Fixtures: one real service per test session (see harness.py), stubs, and helpers."""

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
from tests.harness import CLUSTER, Harness
from tests.redis_cluster import RedisClusterHarness, running_cluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """TEST_REDIS_CLUSTER=1: the tests that need the service's single redis-server skip."""
    if not CLUSTER:
        return
    skip = pytest.mark.skip(reason="needs the single redis-server (TEST_REDIS_CLUSTER=1)")
    for item in items:
        if item.get_closest_marker("single_redis") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def session_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisClusterHarness | None]:
    """The 3+3 cluster the session's service runs on under TEST_REDIS_CLUSTER=1, else None."""
    if not CLUSTER:
        yield None
        return
    with running_cluster(Path(tmp_path_factory.mktemp("redis-cluster"))) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def harness(
    tmp_path_factory: pytest.TempPathFactory, session_cluster: RedisClusterHarness | None
) -> Iterator[Harness]:
    running = Harness(Path(tmp_path_factory.mktemp("service")), redis_cluster=session_cluster)
    yield running
    running.close()


@pytest.fixture(scope="session")
def channel(harness: Harness) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(harness.address) as opened:
        yield opened


@pytest.fixture(scope="session")
def registry(channel: grpc.Channel) -> registry_pb2_grpc.RegistryServiceStub:
    return registry_pb2_grpc.RegistryServiceStub(channel)


@pytest.fixture(scope="session")
def relationships(channel: grpc.Channel) -> relationship_pb2_grpc.RelationshipServiceStub:
    return relationship_pb2_grpc.RelationshipServiceStub(channel)


@pytest.fixture(scope="session")
def authorizations(channel: grpc.Channel) -> authorization_pb2_grpc.AuthorizationServiceStub:
    return authorization_pb2_grpc.AuthorizationServiceStub(channel)
