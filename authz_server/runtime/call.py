"""A generic JSON caller for any RPC of the contract (for trying things and for demos)."""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor

from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    registry_pb2,
    relationship_pb2,
)

FILES = [registry_pb2.DESCRIPTOR, relationship_pb2.DESCRIPTOR, authorization_pb2.DESCRIPTOR]


def find_method(name: str) -> MethodDescriptor:
    service_name, _, method_name = name.partition("/")
    for file in FILES:
        service = file.services_by_name.get(service_name.removeprefix("medwallet.v1."))
        if service is not None and method_name in service.methods_by_name:
            return service.methods_by_name[method_name]
    raise SystemExit(f"unknown method {name!r}; e.g. RelationshipService/GetRelationship")


def call_json(host: str, port: int, name: str, request_json: str, token: str) -> int:
    method = find_method(name)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(request_json, request_class())
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub: grpc.UnaryUnaryMultiCallable[Any, Any] = channel.unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        try:
            response = stub(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(json.dumps(json_format.MessageToDict(response), ensure_ascii=False, indent=2))
    return 0
