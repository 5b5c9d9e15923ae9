"""The benchmark's other servers (floor, baseline) add their services as the service does: as
generic handlers only, not by name (authz_server/server/wrapped_server.py says why: grpc.aio
waits on one future per method added by name for every call it accepts). Otherwise the floor
would pay a cost the service no longer pays, and the service/floor ratio would flatter it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc


class GenericOnly:
    """What the generated add_*_to_server functions are given instead of the server: they add
    each service both ways, and only the generic handler reaches `server`."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(tuple(handlers))

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Any]
    ) -> None:
        """Nothing: the generic handler added with them serves the same methods."""
