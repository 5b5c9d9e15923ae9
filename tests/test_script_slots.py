"""Every script call touches one Redis Cluster slot: its KEYS, and every key name it receives
as an argument to build keys from (a beneficiary's prefix `mw:{b:<tag>}`), hash to one slot,
the slot of the generation marker lua/_generation.lua reads (built from KEYS[1]).

A cluster node itself refuses a script that touches two slots (CROSSSLOT), so the engine tests
run on a cluster (TEST_REDIS_CLUSTER=1, tests/conftest.py) prove it for what they run; this
test checks it directly on any Redis, from the commands the service sends during a payment's
whole life (allocate, Authorize, partial Capture, Refund, Void, dissolve)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from redis.crc import key_slot

from authz_server.storage.redis import scripts
from authz_server.storage.redis.pipelined import SCRIPT_NAMES, Command, Reply
from tests.harness import Harness
from tests.test_authorization_rules import (
    APPROVED,
    CAPTURED,
    HOSPITAL,
    MEDICAL,
    VOIDED,
    authorize,
    capture,
    dissolve,
    family,
    refund,
    register_merchants,
    void,
)

pytestmark = pytest.mark.backend_neutral


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


def key_names(command: Command) -> list[str]:
    """An EVALSHA's KEYS, and its arguments that are key names or key prefixes of ours."""
    count = int(command[2])
    names = [str(key) for key in command[3 : 3 + count]]
    for argument in command[3 + count :]:
        if isinstance(argument, str) and argument.startswith("mw:"):
            names.append(argument)
    return names


def marker_of(first_key: str) -> str:
    """The generation marker lua/_generation.lua reads for a script whose KEYS[1] is this."""
    return first_key[: first_key.index("}") + 1] + ":g"


def test_every_script_of_a_payment_touches_one_slot(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    client = harness.app.pipelined_redis
    sent: list[Command] = []
    transmit = client.transmit

    async def recording(commands: Sequence[Command]) -> list[Reply]:
        sent.extend(command for command in commands if command[0] == "EVALSHA")
        return await transmit(commands)

    client.transmit = recording  # type: ignore[method-assign]
    try:
        fam = family(registry, relationships, 30_000, 20_000)
        paid = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 40_000)
        assert paid.decision == APPROVED
        assert capture(authorizations, HOSPITAL, paid.authorization_id, 35_000).status == CAPTURED
        refund(authorizations, HOSPITAL, paid.authorization_id, 5_000)
        held = authorize(authorizations, HOSPITAL, fam.beneficiary_id, MEDICAL, 1_000)
        assert void(authorizations, HOSPITAL, held.authorization_id).status == VOIDED
        dissolve(relationships, fam.relationship_ids[0])
    finally:
        del client.transmit  # the class's own again
    seen = set()
    for command in sent:
        name = SCRIPT_NAMES.get(str(command[1]), "?")
        seen.add(name)
        names = key_names(command)
        if name not in scripts.NOT_HOT_STATE:
            names.append(marker_of(names[0]))
        slots = {key_slot(key.encode()) for key in names}
        assert len(slots) == 1, f"{name} touches {len(slots)} slots: {names}"
    wanted = {"authorize", "capture_begin", "capture_finish", "void", "quota_credit"}
    wanted |= {"quota_dissolve"}
    assert wanted <= seen, f"not seen: {wanted - seen}"
