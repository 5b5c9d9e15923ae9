"""Fuzzing every RPC the server lists through reflection: random field values, garbage bytes,
bodies with bad UTF-8 and truncated fields, under every kind of principal and none.

No call may end INTERNAL or UNKNOWN, the server keeps serving, and a refused call writes
nothing (SQL row counts of every table and the Redis key count are unchanged)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from redis import Redis
from sqlalchemy import create_engine, func, select

from authz_server.storage.sql.tables import Base
from tests.harness import ADMIN, APP, Harness, bearer

pytestmark = pytest.mark.backend_neutral

SEED = 14
CALLS_PER_METHOD = 25
PRINCIPALS = [ADMIN, APP, bearer("test-merchant-a"), bearer("not-a-token"), ()]
# The principal each service expects (used for most calls, so the fuzz gets past auth).
EXPECTED = {
    "RegistryService": ADMIN,
    "SettlementService": ADMIN,
    "RelationshipService": APP,
    "AuthorizationService": bearer("test-merchant-a"),
    "AuditService": ADMIN,
}
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture(scope="module")
def methods(channel: grpc.Channel) -> list[tuple[str, Descriptor]]:
    """(full method path, input descriptor) of every unary medwallet.v1 method, by reflection."""
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(database)
    found = []
    for service_name in database.get_services():
        if not service_name.startswith("medwallet.v1."):
            continue
        service = pool.FindServiceByName(service_name)
        method: MethodDescriptor
        for method in service.methods:
            found.append((f"/{service_name}/{method.name}", method.input_type))
    assert len(found) >= 20, found
    return found


def random_string(rng: random.Random) -> str:
    choices = [
        "",
        "x" * rng.randint(1, 200),
        "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(1, 20))),
        "ok-id_" + str(rng.randint(0, 10**6)),
        "../../etc/passwd",
        "'; DROP TABLE participants; --",
        "\x00\x01",
        "2025-13-45",
    ]
    return rng.choice(choices)


INTS = [0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 10_000_000_001, 100]


def fill(message: Any, rng: random.Random, depth: int = 0) -> None:
    field: FieldDescriptor
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.25:
            continue
        count = rng.randint(0, 3) if field.is_repeated else 1
        for _ in range(count):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth > 2:
                    continue
                target = (
                    getattr(message, field.name).add()
                    if field.is_repeated
                    else getattr(message, field.name)
                )
                if field.message_type.full_name == "google.protobuf.Timestamp":
                    target.seconds = rng.choice([0, -1, 1_700_000_000, 253402300799])
                else:
                    fill(target, rng, depth + 1)
                    target.SetInParent()
                continue
            value = scalar(field, rng)
            if field.is_repeated:
                getattr(message, field.name).append(value)
            else:
                setattr(message, field.name, value)


def scalar(field: FieldDescriptor, rng: random.Random) -> Any:
    if field.type == FieldDescriptor.TYPE_STRING:
        return random_string(rng)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 40))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type == FieldDescriptor.TYPE_ENUM:
        return rng.choice([*[v.number for v in field.enum_type.values], 99, -5])
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice([0.0, -1.5, 1e300, float("nan")])
    value = rng.choice(INTS)
    if field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return abs(value) % 2**32
    if field.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return abs(value) % 2**64
    if field.type in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ):
        return max(-(2**31), min(2**31 - 1, value))
    return value


def bad_bodies(rng: random.Random, valid: bytes) -> Iterator[bytes]:
    """Bodies that do not parse: bad UTF-8 in field 1 (a string in every request that has one),
    a truncated length-delimited field, an invalid wire type, random bytes, a valid body cut."""
    yield b"\x0a\x03\xff\xfe\xfd"
    yield b"\x0a\x10abc"
    yield b"\x0f\x01"
    yield b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    yield rng.randbytes(rng.randint(1, 64))
    if len(valid) > 1:
        yield valid[: rng.randint(1, len(valid) - 1)]


def written(engine: Any, redis: Redis) -> tuple[int, ...]:
    """Row count of every table and the Redis key count. The audit trail is left out: it
    records every authenticated attempt on a person's data, refused ones included, by design;
    so are the limiter's buckets."""
    with engine.connect() as connection:
        counts = [
            connection.execute(select(func.count()).select_from(table)).scalar_one()
            for table in Base.metadata.sorted_tables
            if table.name != "audit_records"
        ]
    # the limiter's buckets ({rl:...}) are counted out: they count attempts, refused ones too
    keys = sum(1 for key in redis.scan_iter(count=1000) if not key.startswith(b"{rl:"))
    return (*counts, keys)


def settled(engine: Any, redis: Redis) -> tuple[int, ...]:
    """Counts once background writes have stopped changing them: unchanged for 0.3 s. A call's
    journal row and ledger rows commit before it is answered; what may come later is Redis's
    (a sweep) and the audit trail's batch (every 0.2 s, not counted)."""
    previous, stable = written(engine, redis), 0
    while stable < 3:
        time.sleep(0.1)
        now = written(engine, redis)
        stable = stable + 1 if now == previous else 0
        previous = now
    return previous


def test_every_rpc_survives_random_and_garbage_input(
    harness: Harness, channel: grpc.Channel, methods: list[tuple[str, Descriptor]]
) -> None:
    rng = random.Random(SEED)
    engine = create_engine(harness.database_url)
    redis = harness.admin()
    codes: dict[grpc.StatusCode, int] = {}
    before = settled(engine, redis)
    refused: list[tuple[bytes, grpc.StatusCode]] = []  # since `before` was read

    def check_refused_wrote_nothing(path: str) -> tuple[int, ...]:
        """Refused calls write nothing (the sweeper may only remove Redis keys): checked over
        each run of refused calls (a count per call made the test ~30 ms a call), naming the
        run's bodies when it fails."""
        now = written(engine, redis)
        assert now[:-1] == before[:-1], (path, refused)
        assert now[-1] <= before[-1], (path, refused)
        refused.clear()
        return now

    try:
        for path, descriptor in methods:
            message_class = message_factory.GetMessageClass(descriptor)
            call = channel.unary_unary(path)  # raw bytes in and out
            bodies: list[bytes] = []
            for _ in range(CALLS_PER_METHOD):
                message = message_class()
                fill(message, rng)
                bodies.append(message.SerializeToString())
            garbage = [b for body in bodies[:3] for b in bad_bodies(rng, body)]
            for body in bodies + garbage:
                service = path.split("/")[1].rsplit(".", 1)[1]
                expected = EXPECTED[service]
                principal = expected if rng.random() < 0.7 else rng.choice(PRINCIPALS)
                try:
                    call(body, metadata=principal, timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                codes[code] = codes.get(code, 0) + 1
                assert code not in FORBIDDEN, (path, body, code)
                if not _parses(message_class, body):  # before the principal is even looked at
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, body, code)
                if code != grpc.StatusCode.OK:
                    refused.append((body, code))
                else:  # the refused ones before it, then its background writes (the journal)
                    check_refused_wrote_nothing(path)
                    before = settled(engine, redis)
            before = check_refused_wrote_nothing(path)
        health = health_pb2_grpc.HealthStub(channel)
        serving = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert serving.status == health_pb2.HealthCheckResponse.SERVING
        print("fuzz outcomes:", {code.name: count for code, count in codes.items()})
        assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
    finally:
        engine.dispose()
        redis.close()


def _parses(message_class: Any, body: bytes) -> bool:
    try:
        message_class.FromString(body)
    except Exception:
        return False
    return True
