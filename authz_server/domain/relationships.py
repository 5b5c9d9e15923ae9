"""The relationship rules of POLICY.md ("Relationship rules" 1-8), each in one function.

Every refusal is a PolicyRefusal whose reason the transport sends as FAILED_PRECONDITION.
"""

from __future__ import annotations

from collections.abc import Iterable

from authz_server.domain.errors import LedgerLimitExceeded, PolicyRefusal
from authz_server.domain.model import Participant, QuotaTotals, Relationship
from authz_server.domain.types import (
    DissolutionReason,
    InsuranceEventType,
    ParticipantStatus,
    Party,
    Relation,
    RelationshipStatus,
    Scheme,
)

# Rule 2: close relatives per notice 000; provinces may narrow or widen it by configuration.
DEFAULT_ALLOWED_RELATIONS: frozenset[Relation] = frozenset(
    {
        Relation.SPOUSE,
        Relation.PARENT,
        Relation.CHILD,
        Relation.SIBLING,
        Relation.GRANDPARENT,
        Relation.GRANDCHILD,
        Relation.OTHER,
    }
)

OPEN_STATUSES = frozenset({RelationshipStatus.PENDING_CONSENT, RelationshipStatus.ACTIVE})


def check_holder(holder: Participant) -> None:
    """Rule 1: the holder is an active employee-BMI participant (only they have an account)."""
    if holder.scheme is not Scheme.EMPLOYEE:
        raise PolicyRefusal(
            "HOLDER_NOT_EMPLOYEE", f"holder {holder.participant_id} is not in the employee scheme"
        )
    check_active(holder)


def check_active(participant: Participant) -> None:
    """Rule 1: both parties must be active participants (either scheme for the beneficiary)."""
    if participant.status is not ParticipantStatus.ACTIVE:
        raise PolicyRefusal(
            "PARTICIPANT_NOT_ACTIVE", f"participant {participant.participant_id} is not active"
        )


def check_proposal(
    holder: Participant,
    beneficiary: Participant,
    relation: Relation,
    allowed_relations: Iterable[Relation],
    open_relationship_exists: bool,
) -> None:
    """Rules 1-3: who may share with whom; at most one open relationship per pair."""
    if holder.participant_id == beneficiary.participant_id:
        raise PolicyRefusal("SELF_SHARING", "a person cannot share with themselves")
    check_holder(holder)
    check_active(beneficiary)
    if relation not in frozenset(allowed_relations):
        raise PolicyRefusal(
            "RELATION_NOT_ALLOWED", f"relation {relation.value} is not a close relative here"
        )
    if open_relationship_exists:
        raise PolicyRefusal(
            "DUPLICATE_RELATIONSHIP",
            f"{holder.participant_id} already shares with {beneficiary.participant_id}",
        )


def check_consent(
    relationship: Relationship, holder: Participant, beneficiary: Participant
) -> None:
    """Rule 4: consent is given while pending, by parties that still qualify."""
    if relationship.status is not RelationshipStatus.PENDING_CONSENT:
        raise PolicyRefusal(
            "RELATIONSHIP_NOT_PENDING",
            f"relationship {relationship.relationship_id} is {relationship.status.value}",
        )
    check_holder(holder)
    check_active(beneficiary)


def becomes_active(relationship: Relationship, party: Party) -> bool:
    """Rule 4: active once both have consented (the other party's earlier consent counts)."""
    holder = relationship.holder_consented or party is Party.HOLDER
    beneficiary = relationship.beneficiary_consented or party is Party.BENEFICIARY
    return holder and beneficiary


def check_can_dissolve(relationship: Relationship) -> None:
    """Rule 4: either party may dissolve an open relationship; dissolving twice is refused."""
    if relationship.status not in OPEN_STATUSES:
        raise PolicyRefusal(
            "RELATIONSHIP_NOT_ACTIVE",
            f"relationship {relationship.relationship_id} is already dissolved",
        )


def check_quota_movable(relationship: Relationship, holder: Participant) -> None:
    """Rule 5: quota moves only on an active relationship whose holder is still active.

    Rule 6 (no re-sharing) holds by construction: allocation always debits the holder's own
    personal account, and received quota never enters anybody's personal account.
    """
    if relationship.status is not RelationshipStatus.ACTIVE:
        raise PolicyRefusal(
            "RELATIONSHIP_NOT_ACTIVE",
            f"relationship {relationship.relationship_id} is {relationship.status.value}",
        )
    check_holder(holder)


def check_balance(holder: Participant, amount_fen: int) -> None:
    """Rule 5: allocation is limited to the holder's available personal-account balance."""
    if amount_fen > holder.balance_fen:
        raise PolicyRefusal(
            "INSUFFICIENT_BALANCE",
            f"holder balance {holder.balance_fen} fen is less than {amount_fen} fen",
        )


def check_release(available_fen: int, amount_fen: int) -> None:
    """Rule 5: only unused, unheld quota can be taken back. `available_fen` is below zero
    while holds over-commit the quota (QuotaView.shown): nothing is free then."""
    free_fen = max(0, available_fen)
    if amount_fen > free_fen:
        raise PolicyRefusal(
            "INSUFFICIENT_QUOTA",
            f"only {free_fen} fen of the quota is available to release",
        )


def check_ledger_pays(relationship_id: str, totals: QuotaTotals, amount_fen: int) -> None:
    """The ledger's limit (QuotaTotals.within_ledger_limit): money leaves a quota (a capture,
    a release) only if the ledger has it unused, whatever the hot state approved. Checked
    under the relationship's row lock, in the transaction that moves the money; `totals`
    include what that transaction moved before."""
    if amount_fen > totals.unused_fen:
        raise LedgerLimitExceeded(relationship_id, totals.unused_fen, amount_fen)


def dissolution_reason(
    event: InsuranceEventType, relationship: Relationship, participant_id: str
) -> DissolutionReason | None:
    """Rule 7: which reason an insurance event gives a relationship of that person (None: keep)."""
    as_holder = relationship.holder_id == participant_id
    if event is InsuranceEventType.TERMINATED:
        return (
            DissolutionReason.HOLDER_TERMINATED
            if as_holder
            else DissolutionReason.BENEFICIARY_TERMINATED
        )
    if event is InsuranceEventType.TRANSFERRED:
        return (
            DissolutionReason.HOLDER_TRANSFERRED
            if as_holder
            else DissolutionReason.BENEFICIARY_TRANSFERRED
        )
    return None
