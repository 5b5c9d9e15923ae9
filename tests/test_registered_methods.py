"""The service's methods reach grpc.aio as generic handlers, never registered by name
(server/wrapped_server.py): grpc.aio waits on one future per method registered by name for every
call it accepts, ~8% of an Authorize's CPU with this service's ~26 methods."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from authz_server.generated.medwallet.v1 import authorization_pb2, authorization_pb2_grpc
from authz_server.observability import interceptor
from authz_server.server.edge import EdgeServer


class RecordingServer:
    """A real grpc.aio server, with a note of how handlers were added to it."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.by_name: list[str] = []
        self.generic = 0

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Any]
    ) -> None:
        self.by_name.append(service_name)
        self.server.add_registered_method_handlers(service_name, method_handlers)

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        handlers = tuple(handlers)
        self.generic += len(handlers)
        self.server.add_generic_rpc_handlers(handlers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


class Echo(authorization_pb2_grpc.AuthorizationServiceServicer):
    async def Authorize(self, request: Any, context: Any) -> Any:
        return authorization_pb2.AuthorizeResponse(approved_amount_fen=request.amount_fen)


def test_methods_added_by_name_are_served_through_generic_handlers_and_still_wrapped() -> None:
    from prometheus_client import REGISTRY

    def started() -> float:
        labels = {
            "grpc_type": "unary",
            "grpc_service": "medwallet.v1.AuthorizationService",
            "grpc_method": "Authorize",
        }
        return REGISTRY.get_sample_value("grpc_server_started_total", labels) or 0.0

    async def main() -> None:
        raw = RecordingServer()
        server = EdgeServer(interceptor.ObservedServer(raw, access_log=False))  # type: ignore[arg-type]
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(Echo(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        # the generated code adds each service both ways; none of it arrives by name
        assert raw.by_name == []
        assert raw.generic == 4
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            before = started()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = authorization_pb2_grpc.AuthorizationServiceStub(channel)
                answer = await stub.Authorize(authorization_pb2.AuthorizeRequest(amount_fen=7))
                assert answer.approved_amount_fen == 7
                checked = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest()
                )
                assert checked.status == health_pb2.HealthCheckResponse.SERVING
                # a method the service has not: UNIMPLEMENTED, as before
                unknown = authorization_pb2_grpc.AuthorizationServiceStub(channel).Capture
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await unknown(authorization_pb2.CaptureRequest())
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # the observed layer wrapped the handler found through the generic path
            assert started() - before == 1
        finally:
            await server.stop(0)

    asyncio.run(main())
