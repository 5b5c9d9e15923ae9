"""A Locust user that speaks gRPC, in the pattern Locust documents for other protocols.

- grpc is patched for gevent (`grpc.experimental.gevent.init_gevent()`), so a blocking stub
  call yields to the other simulated users instead of blocking the process;
- every unary call goes through `LocustInterceptor`, which fires Locust's `request` event with
  the response time, the response size and, for a gRPC error, an exception naming the status
  code and the `google.rpc.ErrorInfo` reason (so failures group by reason in Locust's report).

A business refusal (DECISION_DECLINED) is a normal response, so it is not a failure; the tasks
count decisions in the request name instead (see scenarios.py).
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from locust import User
from locust.env import Environment

grpc_gevent.init_gevent()


class GrpcFailure(Exception):
    """What Locust records for a failed call: the code and reason, not the whole debug text."""


def describe(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    reason = ""
    try:
        status = rpc_status.from_call(error)
    except Exception:  # a status without rich details, or not a call
        status = None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    name = code.name if code is not None else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{name} {reason}: {details}" if reason else f"{name}: {details}"


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Fires a Locust request event for every unary call made through the channel."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        # Set by the task before a call: the name the call is reported under.
        self.label = ""

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        started = time.perf_counter()
        exception: Exception | None = None
        length = 0
        call = continuation(client_call_details, request)
        try:
            length = call.result().ByteSize()
        except grpc.RpcError as error:
            exception = GrpcFailure(describe(error))
        method = client_call_details.method
        name = self.label or method.rsplit(".", 1)[-1]
        self.environment.events.request.fire(  # type: ignore[no-untyped-call]
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            response=call,
            context=None,
            exception=exception,
        )
        return call


class GrpcUser(User):
    """Opens one channel per simulated user (a till, a cashier, an app session)."""

    abstract = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise ValueError("give the server address with --host, e.g. --host 127.0.0.1:50051")
        target = self.host.removeprefix("grpc://").removeprefix("http://")
        self.interceptor = LocustInterceptor(environment)
        self._raw_channel = grpc.insecure_channel(target)
        self.channel = grpc.intercept_channel(self._raw_channel, self.interceptor)

    def call(
        self, label: str, method: Any, request: Any, token: str | None, timeout: float = 10.0
    ) -> Any:
        """Calls a stub method under `label`; None when it failed (already reported)."""
        self.interceptor.label = label
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        try:
            return method(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError:
            return None

    def on_stop(self) -> None:
        self._raw_channel.close()
