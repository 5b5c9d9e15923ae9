"""A one-step payment (a premium) whose SQL write fails for a reason that is not a refusal is
settled as SQL says, never simply voided: when the COMMIT went through but its reply was lost
(a dropped PostgreSQL connection), voiding would give money SQL counts as spent back to the
quota in Redis, and the family could spend it twice. The faults are injected where the driver
would raise them: after or instead of the batch's real transaction."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy.exc import OperationalError

from authz_server.service.capture_writer import CaptureUnit, CaptureWriter, Outcome
from tests.harness import Harness
from tests.test_authorization_recovery import ledger
from tests.test_authorization_rules import (
    CAPTURED,
    COLLECTOR,
    LTC_PREMIUM,
    authorize,
    family,
    figures,
    register_merchants,
)

LOST = OperationalError("COMMIT", None, Exception("server closed the connection unexpectedly"))


@pytest.fixture(scope="module", autouse=True)
def merchants(registry: Any) -> None:
    register_merchants(registry)


@pytest.fixture()
def writer(harness: Harness) -> Iterator[CaptureWriter]:
    captures = harness.app.authorizations.captures
    real = captures._commit
    yield captures
    captures._commit = real  # type: ignore[method-assign]


def failing_commit(real: Callable[[list[CaptureUnit]], list[Outcome]], *, commits: bool) -> Any:
    def commit(units: list[CaptureUnit]) -> list[Outcome]:
        if commits:
            real(units)  # the transaction commits ...
        raise LOST  # ... and its answer is lost (or it never got that far)

    return commit


def test_a_commit_whose_reply_was_lost_is_answered_captured_and_not_given_back(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    real = writer._commit
    writer._commit = failing_commit(real, commits=True)
    answer = authorize(authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000)
    assert answer.status == CAPTURED
    # Redis and SQL agree: 15,000 spent, 5,000 left, nothing held (voiding it would show 20,000
    # available beside 15,000 spent).
    assert figures(relationships, relationship_id) == (5_000, 0, 15_000)
    assert ledger(harness, relationship_id).spent_fen == 15_000
    # The money given back would have paid a second premium; there is not enough for one now.
    writer._commit = real
    again = authorize(authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000)
    assert again.approved_amount_fen == 0


def test_a_write_that_never_happened_is_voided_and_answers_unavailable(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any, writer: Any
) -> None:
    fam = family(registry, relationships, 20_000)
    (relationship_id,) = fam.relationship_ids
    writer._commit = failing_commit(writer._commit, commits=False)
    with pytest.raises(grpc.RpcError) as failed:
        authorize(authorizations, COLLECTOR, fam.beneficiary_id, LTC_PREMIUM, 15_000)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert figures(relationships, relationship_id) == (20_000, 0, 0)
    assert ledger(harness, relationship_id).spent_fen == 0
