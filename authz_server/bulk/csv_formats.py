"""The CSV files `medwallet-authz load-csv` reads, and the parsing of one row of each.

Every file is UTF-8 (a byte-order mark is allowed), comma-separated with `"` quoting, and starts
with a header row naming exactly the columns below, in any order. Blank lines are skipped.
Each field is checked with the same rules as the gRPC API (`authz_server.domain.validation`);
values are taken as written (no trimming), so `" 110100"` is refused like it would be over gRPC.

participants  `participant_id,scheme,pooling_region`
    scheme EMPLOYEE or RESIDENT; pooling_region a 6-digit division code such as 110100.
    Created ACTIVE with balance 0. A participant already there with the same scheme and region
    is left alone (counted "unchanged"); with another scheme or region the row is refused
    (CHANGE_REQUIRES_INSURANCE_EVENT), as UpsertParticipant refuses it.
credits       `participant_id,amount_fen,idempotency_key`
    Money arriving in an employee's personal account, like CreditPersonalAccount: amount in fen,
    1..10,000,000,000; one ACCOUNT_CREDIT ledger row each; the key is recorded (scope "credit")
    so the same credit sent again, by this loader or through the API with the same key and
    body, is not credited twice. A key seen before with another body is refused
    (IDEMPOTENCY_KEY_REUSED).
merchants     `merchant_id,kind,pooling_region,designated,name`
    kind MEDICAL_INSTITUTION, RETAIL_PHARMACY or PREMIUM_COLLECTOR; designated true/false;
    name up to 200 characters. Inserted or updated, like UpsertMerchant.
items         `item_code,name,category,eligible`
    category DRUG, DEVICE, CONSUMABLE or MEDICAL_SERVICE; eligible true/false. Inserted or
    updated, like UpsertCatalogItems.
relationships `relationship_id,holder_id,beneficiary_id,relation,quota_fen`
    relation SPOUSE, PARENT, CHILD, SIBLING, GRANDPARENT, GRANDCHILD or OTHER (only those the
    MEDWALLET_ALLOWED_RELATIONS setting allows); quota_fen 0 (or empty) for no quota, else
    1..10,000,000,000. Loaded ACTIVE with both parties' consent through the channel
    PROVINCIAL_PLATFORM (events PROPOSED, CONSENTED by each party, ACTIVATED), the quota moved
    from the holder's personal account with a QUOTA_ALLOCATION ledger row. The relationship
    rules apply as in ProposeRelationship and AllocateQuota: the holder an active employee, the
    beneficiary active, nobody sharing with themselves, one open relationship per pair, the
    quota within the holder's balance. A relationship_id already loaded with the same
    holder, beneficiary, relation and quota is left alone ("unchanged"), so a load can be rerun.

Booleans are true/false, 1/0 or yes/no (any case); amounts are plain decimal integers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar, cast

from authz_server.domain import validation
from authz_server.domain.errors import InvalidArgument
from authz_server.domain.model import CatalogItem, Merchant
from authz_server.domain.types import ItemCategory, MerchantKind, Relation, Scheme

R = TypeVar("R")
E = TypeVar("E", bound=StrEnum)

_INTEGER = re.compile(r"-?[0-9]{1,19}")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_MEMBERS: dict[type[StrEnum], dict[str, StrEnum]] = {}


class Kind(StrEnum):
    """The kinds of file, in the order a load applies them (later ones refer to earlier)."""

    PARTICIPANTS = "participants"
    CREDITS = "credits"
    MERCHANTS = "merchants"
    ITEMS = "items"
    RELATIONSHIPS = "relationships"


@dataclass(frozen=True)
class ParticipantRecord:
    participant_id: str
    scheme: Scheme
    pooling_region: str


@dataclass(frozen=True)
class CreditRecord:
    participant_id: str
    amount_fen: int
    idempotency_key: str


@dataclass(frozen=True)
class RelationshipRecord:
    relationship_id: str
    holder_id: str
    beneficiary_id: str
    relation: Relation
    quota_fen: int


def _enum(field: str, value: str, enum: type[E]) -> E:
    """validation.choice, with a dictionary look-up first (a million rows, a few names)."""
    members = _MEMBERS.get(enum)
    if members is None:
        members = _MEMBERS[enum] = {member.value: member for member in enum}
    member = members.get(value)
    if member is not None:
        return cast(E, member)
    return validation.choice(field, value or None, enum)


def _boolean(field: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidArgument(field, "must be true or false")


def _integer(field: str, value: str) -> int:
    if not _INTEGER.fullmatch(value):
        raise InvalidArgument(field, "must be a whole number of fen")
    return int(value)


def _amount(field: str, value: str) -> int:
    return validation.amount_fen(field, _integer(field, value))


def _quota(field: str, value: str) -> int:
    """0 or empty: a relationship without quota; otherwise an amount like AllocateQuota's."""
    if value in ("", "0"):
        return 0
    return _amount(field, value)


def participant(row: Sequence[str]) -> ParticipantRecord:
    participant_id, scheme, region = row
    return ParticipantRecord(
        participant_id=validation.identifier("participant_id", participant_id),
        scheme=_enum("scheme", scheme, Scheme),
        pooling_region=validation.pooling_region("pooling_region", region),
    )


def credit(row: Sequence[str]) -> CreditRecord:
    participant_id, amount, key = row
    return CreditRecord(
        participant_id=validation.identifier("participant_id", participant_id),
        amount_fen=_amount("amount_fen", amount),
        idempotency_key=validation.idempotency_key("idempotency_key", key),
    )


def merchant(row: Sequence[str]) -> Merchant:
    merchant_id, kind, region, designated, name = row
    return Merchant(
        merchant_id=validation.identifier("merchant_id", merchant_id),
        kind=_enum("kind", kind, MerchantKind),
        pooling_region=validation.pooling_region("pooling_region", region),
        designated=_boolean("designated", designated),
        name=validation.name("name", name),
    )


def item(row: Sequence[str]) -> CatalogItem:
    item_code, name, category, eligible = row
    return CatalogItem(
        item_code=validation.identifier("item_code", item_code),
        name=validation.name("name", name),
        category=_enum("category", category, ItemCategory),
        eligible=_boolean("eligible", eligible),
    )


def relationship(row: Sequence[str]) -> RelationshipRecord:
    relationship_id, holder_id, beneficiary_id, relation, quota = row
    return RelationshipRecord(
        relationship_id=validation.identifier("relationship_id", relationship_id),
        holder_id=validation.identifier("holder_id", holder_id),
        beneficiary_id=validation.identifier("beneficiary_id", beneficiary_id),
        relation=_enum("relation", relation, Relation),
        quota_fen=_quota("quota_fen", quota),
    )


@dataclass(frozen=True)
class Format(Generic[R]):
    """One kind of file: its columns (in the order `parse` takes them) and the row parser."""

    kind: Kind
    columns: tuple[str, ...]
    parse: Callable[[Sequence[str]], R]

    def reorder(self, header: Sequence[str]) -> list[int]:
        """Positions of `columns` in the file's header; InvalidArgument if they differ."""
        names = list(header)
        missing = [c for c in self.columns if c not in names]
        unknown = [c for c in names if c not in self.columns]
        if missing or unknown or len(names) != len(set(names)):
            problems = []
            if missing:
                problems.append(f"missing {', '.join(missing)}")
            if unknown:
                problems.append(f"unknown {', '.join(unknown)}")
            if len(names) != len(set(names)):
                problems.append("a column is repeated")
            raise InvalidArgument(
                "header", f"must name {','.join(self.columns)} ({'; '.join(problems)})"
            )
        return [names.index(c) for c in self.columns]


PARTICIPANTS = Format(
    Kind.PARTICIPANTS, ("participant_id", "scheme", "pooling_region"), participant
)
CREDITS = Format(Kind.CREDITS, ("participant_id", "amount_fen", "idempotency_key"), credit)
MERCHANTS = Format(
    Kind.MERCHANTS, ("merchant_id", "kind", "pooling_region", "designated", "name"), merchant
)
ITEMS = Format(Kind.ITEMS, ("item_code", "name", "category", "eligible"), item)
RELATIONSHIPS = Format(
    Kind.RELATIONSHIPS,
    ("relationship_id", "holder_id", "beneficiary_id", "relation", "quota_fen"),
    relationship,
)
