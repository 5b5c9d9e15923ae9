"""A first end-to-end path: a holder shares with a parent and allocates quota."""

from __future__ import annotations

from tests import factories


def test_holder_allocates_quota_to_parent(registry, relationships) -> None:
    holder = factories.employee(registry, balance_fen=100_000)
    parent = factories.resident(registry)
    relationship_id = factories.active_relationship(relationships, holder, parent, 30_000)
    shown = factories.relationship(relationships, relationship_id)
    assert (shown.allocated_fen, shown.available_fen, shown.held_fen) == (30_000, 30_000, 0)
    assert factories.balance(registry, holder) == 70_000
