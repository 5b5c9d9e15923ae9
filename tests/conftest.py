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
from tests.harness import Harness


@pytest.fixture(scope="session")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    running = Harness(Path(tmp_path_factory.mktemp("service")))
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
