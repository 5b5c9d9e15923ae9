"""The audit trail's id collection (server/audit.py) walks only the fields that can hold an id
the trail records; it must find exactly what a walk of every set field finds, for every message
of the API filled at random (ids, garbage, nesting)."""

from __future__ import annotations

import importlib
import pkgutil
import random
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

import authz_server.generated.medwallet.v1 as generated
from authz_server.server.audit import MAX_DEPTH, PERSON_FIELDS, RECORDED_ID, _Ids
from tests.test_edge_fuzz import fill


def every_field_walk(message: Message, found: _Ids, depth: int = 0) -> None:
    """The walk over every set field (ListFields) the collection replaced, kept as the oracle."""
    field: FieldDescriptor
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth < MAX_DEPTH:
                for child in value if field.is_repeated else [value]:
                    every_field_walk(child, found, depth + 1)
        elif field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            if not RECORDED_ID.fullmatch(value):
                continue
            if field.name in PERSON_FIELDS and value not in found.persons:
                found.persons.append(value)
            elif field.name == "relationship_id" and not found.relationship_id:
                found.relationship_id = value
            elif field.name == "authorization_id" and not found.authorization_id:
                found.authorization_id = value


def message_classes() -> list[Any]:
    classes = []
    for module_info in pkgutil.iter_modules(generated.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{generated.__name__}.{module_info.name}")
        for name in module.DESCRIPTOR.message_types_by_name:
            classes.append(getattr(module, name))
    assert len(classes) >= 20
    return classes


@pytest.mark.parametrize("message_class", message_classes(), ids=lambda c: c.DESCRIPTOR.name)
def test_the_collection_finds_what_a_walk_of_every_field_finds(message_class: Any) -> None:
    rng = random.Random(message_class.DESCRIPTOR.full_name)
    for _ in range(100):
        message = message_class()
        fill(message, rng)
        expected, collected = _Ids(), _Ids()
        every_field_walk(message, expected)
        collected.collect(message)
        assert (collected.persons, collected.relationship_id, collected.authorization_id) == (
            expected.persons,
            expected.relationship_id,
            expected.authorization_id,
        )
