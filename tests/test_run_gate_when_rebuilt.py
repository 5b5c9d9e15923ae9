"""A Redis step that follows a SQL commit (a refund's credit, a capture's finish) goes through
quota_sync.when_rebuilt: while the hot state is being rebuilt it is tried again until the
rebuild is published, never dropped (a rebuild that read SQL before the commit would leave the
quota without the credit, or the captured hold held, until reconcile). After a failover or a
Redis restart, the run gate refuses the step with UntrustedRedis until the guardian adopts the
rebuilt generation: that refusal must be waited out the same way, not answered at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.service.quota_sync import when_rebuilt
from authz_server.storage.redis.generation import HotStateGeneration
from authz_server.storage.redis.pipelined import PipelinedRedis
from authz_server.storage.redis.quota_cache import guarded
from authz_server.storage.redis.runs import redis_run_ids
from tests.test_run_gate import ECHO, run_gated

pytestmark = pytest.mark.backend_neutral


def test_a_step_after_sql_waits_out_the_run_gate_until_the_rebuild_is_adopted(
    tmp_path: Path,
) -> None:
    async def body(client: PipelinedRedis, gate: HotStateGeneration) -> None:
        # The generation was built on a process that is gone (a primary replaced by its
        # replica, or restarted with its file): the gate refuses this one until the
        # guardian has rebuilt and adopted.
        gate.adopt("g1", "0" * 40)
        current = await redis_run_ids(client)

        async def guardian_rebuilds() -> None:
            await asyncio.sleep(0.6)
            gate.adopt("g2", current)

        rebuilt = asyncio.get_running_loop().create_task(guardian_rebuilds())
        step = lambda: guarded(lambda: client.evalsha(ECHO, ["k"], []), "echo")  # noqa: E731
        # SQL has committed; this step must land once the rebuild is adopted, not be
        # dropped as UNAVAILABLE (the caller does not try it again: its SQL is done).
        assert await when_rebuilt(step) == b"k"
        await rebuilt

    run_gated(EmbeddedRedis(tmp_path / "redis"), body)
