"""The caller's JSON: every RPC of the contract found in the generated descriptors, requests read
from JSON with one clear line for what is wrong, answers written with the proto field names."""

from __future__ import annotations

import importlib
import json
import pkgutil
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from authz_server.generated.medwallet import v1 as generated


class BadRequest(Exception):
    """The request cannot be sent as written: the message names what is wrong and what is
    accepted."""


def all_methods() -> list[MethodDescriptor]:
    """Every RPC of every service in the generated code (so a new .proto needs no edit here)."""
    methods: list[MethodDescriptor] = []
    for module_info in sorted(pkgutil.iter_modules(generated.__path__), key=lambda m: m.name):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{generated.__name__}.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.extend(service.methods)
    return methods


def method_name(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}/{method.name}"


def find_method(name: str) -> MethodDescriptor:
    """`Service/Method`, with or without the package, a leading '/' or a '.' separator."""
    wanted = name.strip().lstrip("/").removeprefix("medwallet.v1.")
    service_name, _, rpc = wanted.replace(".", "/").partition("/")
    for method in all_methods():
        if (method.containing_service.name, method.name) == (service_name, rpc):
            return method
    known = ", ".join(method_name(m) for m in all_methods())
    raise BadRequest(f"unknown method {name!r}; known: {known}")


def parse_request(method: MethodDescriptor, text: str) -> Message:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadRequest(
            f"the request is not valid JSON ({error.msg} at line {error.lineno} column "
            f"{error.colno}); write it as one JSON object in single quotes, e.g. "
            f"'{{\"{_first_field(method.input_type)}\": ...}}'"
        ) from None
    normalized = _normalize(method.input_type, value, method.input_type.name)
    message = message_factory.GetMessageClass(method.input_type)()
    try:
        json_format.ParseDict(normalized, message)
    except json_format.ParseError as error:
        raise BadRequest(f"{method.input_type.name}: {error}") from None
    return message


def answer_json(message: Message) -> str:
    """The answer with the proto field names (as requests are written), every field shown, int64
    as JSON numbers."""
    shown = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )
    return json.dumps(shown, ensure_ascii=False, indent=2)


def _first_field(descriptor: Descriptor) -> str:
    return descriptor.fields[0].name if descriptor.fields else "field"


def _normalize(descriptor: Descriptor, value: Any, path: str) -> Any:
    """value checked against the message: unknown fields and enum names refused with what is
    accepted; short enum names (PHARMACY for PURPOSE_PHARMACY) expanded when unambiguous."""
    if descriptor.full_name.startswith("google.protobuf."):
        return value  # well-known types (Timestamp, ...) have JSON forms of their own
    if not isinstance(value, dict):
        raise BadRequest(f"{path} must be a JSON object, not {json.dumps(value)}")
    fields = {field.name: field for field in descriptor.fields}
    fields.update({field.json_name: field for field in descriptor.fields})
    result: dict[str, Any] = {}
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            accepted = ", ".join(f.name for f in descriptor.fields) or "no fields"
            raise BadRequest(f"unknown field {path}.{key}; {descriptor.name} accepts: {accepted}")
        result[key] = _normalize_field(field, item, f"{path}.{field.name}")
    return result


def _normalize_field(field: FieldDescriptor, value: Any, path: str) -> Any:
    if _is_repeated(field) and isinstance(value, list):
        return [_normalize_single(field, item, f"{path}[{i}]") for i, item in enumerate(value)]
    return _normalize_single(field, value, path)


def _normalize_single(field: FieldDescriptor, value: Any, path: str) -> Any:
    if field.message_type is not None and not field.message_type.GetOptions().map_entry:
        return _normalize(field.message_type, value, path)
    if field.enum_type is not None and isinstance(value, str):
        return enum_value_name(field.enum_type, value, path)
    return value


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def enum_value_name(enum: EnumDescriptor, text: str, path: str) -> str:
    """The enum value's full name for `text`: the name itself, or a unique short form in any
    case (`pharmacy`, `PHARMACY` for PURPOSE_PHARMACY)."""
    names = [value.name for value in enum.values if not value.name.endswith("_UNSPECIFIED")]
    if text in names:
        return text
    wanted = text.strip().upper().replace("-", "_")
    short = [_short(enum, name) for name in names]
    matches = [name for name, brief in zip(names, short, strict=True) if wanted in (name, brief)]
    if not matches:  # a unique start of a short name: MEDICAL for MEDICAL_OUT_OF_POCKET
        matches = [n for n, b in zip(names, short, strict=True) if b.startswith(wanted + "_")]
    if len(matches) == 1:
        return matches[0]
    what = "is ambiguous" if matches else "is not a value"
    raise BadRequest(
        f"{path}: {text!r} {what} of {enum.name}; accepted: {', '.join(names)}"
        f" (or short: {', '.join(short)})"
    )


def _short(enum: EnumDescriptor, name: str) -> str:
    prefix = "".join(
        "_" + c if c.isupper() and i else c.upper() for i, c in enumerate(enum.name)
    ).upper()
    return name.removeprefix(prefix + "_")
