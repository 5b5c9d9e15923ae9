"""A grpc.aio.Server (or a wrapper of one) whose handlers are registered already wrapped,
whichever way they are added: the generated `add_*Servicer_to_server` functions register them by
name and through a generic handler (the grpc.aio server gets both as generic handlers: see
add_registered_method_handlers). Subclasses say how one handler is wrapped (`wrap`); the
layers of the server (observed, audited, limited, guarded at the edge) stack as such wrappers.
Everything else is the wrapped server's."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class WrappedServer(grpc.aio.Server):
    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def wrap(self, full_method: str, handler: Handler) -> Handler:
        """The handler of `full_method` ("/package.Service/Method") as this layer serves it."""
        raise NotImplementedError

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        """What the generated code registers by name, wrapped now by this layer and passed on
        by name to the next; the grpc.aio server itself gets it as a generic handler instead.
        grpc.aio keeps one pending "next call" future per method registered by name and, for
        every call it accepts, waits on all of them again (asyncio.wait): with this service's
        ~26 methods that was ~8% of an Authorize's CPU (loadtest/RESULTS.md). Generic handlers
        share one such future; a call's method is then found by asking them in turn, in the
        order they were added (app.py adds AuthorizationService first)."""
        wrapped = {
            name: self.wrap(f"/{service_name}/{name}", handler)
            for name, handler in method_handlers.items()
        }
        if isinstance(self.server, WrappedServer):
            self.server.add_registered_method_handlers(service_name, wrapped)
        else:
            self.server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service_name, wrapped),)
            )

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self.server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(self, handler) for handler in generic_rpc_handlers)
        )

    def add_insecure_port(self, address: str) -> int:
        return self.server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self.server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout)


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler's answers, wrapped once per method (and kept: only methods it has a
    handler for, so a client sending made-up method names cannot grow the cache)."""

    def __init__(self, owner: WrappedServer, inner: grpc.GenericRpcHandler) -> None:
        self.owner = owner
        self.inner = inner
        self.known: dict[str, tuple[Handler, Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self.known.get(method)
        if known is None or known[0] is not handler:
            known = self.known[method] = (handler, self.owner.wrap(method, handler))
        return known[1]
