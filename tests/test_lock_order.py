"""Insurance events racing allocations and releases on the same people never deadlock (which
PostgreSQL would report as UNAVAILABLE) and never lose or create money."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from authz_server.generated.medwallet.v1 import registry_pb2, relationship_pb2
from tests import factories
from tests.harness import ADMIN, APP, new_id


def test_events_race_quota_moves_without_deadlock(registry, relationships) -> None:
    for _ in range(3):
        holder = factories.employee(registry, balance_fen=1_000_000)
        relatives = [factories.resident(registry) for _ in range(4)]
        relationship_ids = [
            factories.active_relationship(relationships, holder, r, 10_000) for r in relatives
        ]

        def move(index: int, relationship_ids: list[str] = relationship_ids) -> str:
            relationship_id = relationship_ids[index % len(relationship_ids)]
            try:
                if index % 2:
                    relationships.AllocateQuota(
                        relationship_pb2.AllocateQuotaRequest(
                            relationship_id=relationship_id,
                            amount_fen=100,
                            idempotency_key=new_id("a"),
                        ),
                        metadata=APP,
                    )
                else:
                    relationships.ReleaseQuota(
                        relationship_pb2.ReleaseQuotaRequest(
                            relationship_id=relationship_id,
                            amount_fen=100,
                            idempotency_key=new_id("r"),
                        ),
                        metadata=APP,
                    )
                return "ok"
            except grpc.RpcError as error:
                return error.code().name  # type: ignore[no-any-return]

        def terminate(target: str) -> str:
            registry.ReportInsuranceEvent(
                registry_pb2.ReportInsuranceEventRequest(
                    participant_id=target,
                    event_type=registry_pb2.INSURANCE_EVENT_TYPE_TERMINATED,
                    termination_reason=registry_pb2.TERMINATION_REASON_WITHDRAWAL,
                ),
                metadata=ADMIN,
            )
            return "event"

        with ThreadPoolExecutor(8) as pool:
            moves = [pool.submit(move, i) for i in range(40)]
            events = [pool.submit(terminate, r) for r in relatives[:2]]
            events.append(pool.submit(terminate, holder))
            outcomes = [m.result() for m in moves] + [e.result() for e in events]
        assert "UNAVAILABLE" not in outcomes, outcomes
        assert set(outcomes) <= {"ok", "event", "FAILED_PRECONDITION"}, outcomes
        # Everything was dissolved and returned: the holder has all the money back.
        assert factories.balance(registry, holder) == 1_000_000
        for relationship_id in relationship_ids:
            shown = factories.relationship(relationships, relationship_id)
            assert (shown.allocated_fen, shown.available_fen, shown.held_fen) == (0, 0, 0)
