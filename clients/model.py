"""The client's typed view of the contract: enums, frozen result dataclasses, and money helpers.

Every enum mirrors one enum of `protos/medwallet/v1` member for member, with the proto's prefix
dropped (`DECLINE_REASON_INSUFFICIENT_QUOTA` is `DeclineReason.INSUFFICIENT_QUOTA`) and the same
number as its value. Money is always an `int` of fen (0.01 yuan); timestamps are aware UTC
datetimes, or None where the server left them unset.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import Enum


class Decision(Enum):
    UNSPECIFIED = 0
    APPROVED = 1
    #: Part of the amount approved (allow_partial); the rest is paid another way.
    PARTIALLY_APPROVED = 2
    DECLINED = 3


class DeclineReason(Enum):
    UNSPECIFIED = 0
    RELATIONSHIP_NOT_FOUND = 1
    RELATIONSHIP_NOT_ACTIVE = 2
    INSUFFICIENT_QUOTA = 3
    ITEM_NOT_ELIGIBLE = 4
    PURPOSE_NOT_ALLOWED = 5
    MERCHANT_NOT_DESIGNATED = 6
    BENEFICIARY_NOT_ELIGIBLE = 7
    #: An earlier call with this key placed a hold never confirmed (the server stopped, or the
    #: call was given up); it was released: authorize again with a new idempotency key.
    HOLD_ABANDONED = 8


class AuthorizationStatus(Enum):
    UNSPECIFIED = 0
    #: A hold is open.
    PENDING = 1
    CAPTURED = 2
    VOIDED = 3
    EXPIRED = 4
    DECLINED = 5


class Purpose(Enum):
    UNSPECIFIED = 0
    #: The out-of-pocket part of a bill at a designated medical institution.
    MEDICAL_OUT_OF_POCKET = 1
    #: Eligible drugs, devices and consumables at a designated retail pharmacy.
    PHARMACY = 2
    #: The beneficiary's resident-scheme contribution; in full or not at all.
    RESIDENT_PREMIUM = 3
    #: The beneficiary's long-term-care premium; in full or not at all.
    LTC_PREMIUM = 4


class Scheme(Enum):
    UNSPECIFIED = 0
    EMPLOYEE = 1
    RESIDENT = 2


class ParticipantStatus(Enum):
    UNSPECIFIED = 0
    ACTIVE = 1
    TERMINATED = 2


class MerchantKind(Enum):
    UNSPECIFIED = 0
    MEDICAL_INSTITUTION = 1
    RETAIL_PHARMACY = 2
    PREMIUM_COLLECTOR = 3


class ItemCategory(Enum):
    UNSPECIFIED = 0
    DRUG = 1
    DEVICE = 2
    CONSUMABLE = 3
    MEDICAL_SERVICE = 4


class Relation(Enum):
    UNSPECIFIED = 0
    SPOUSE = 1
    PARENT = 2
    CHILD = 3
    SIBLING = 4
    GRANDPARENT = 5
    GRANDCHILD = 6
    OTHER = 7


class Party(Enum):
    UNSPECIFIED = 0
    HOLDER = 1
    BENEFICIARY = 2


class RelationshipStatus(Enum):
    UNSPECIFIED = 0
    PENDING_CONSENT = 1
    ACTIVE = 2
    DISSOLVED = 3


class DissolutionReason(Enum):
    UNSPECIFIED = 0
    VOLUNTARY = 1
    HOLDER_TERMINATED = 2
    BENEFICIARY_TERMINATED = 3
    HOLDER_TRANSFERRED = 4
    BENEFICIARY_TRANSFERRED = 5


class Channel(Enum):
    UNSPECIFIED = 0
    APP = 1
    PROVINCIAL_PLATFORM = 2
    SERVICE_WINDOW = 3


class InsuranceEventType(Enum):
    UNSPECIFIED = 0
    TERMINATED = 1
    TRANSFERRED = 2
    REINSTATED = 3


class TerminationReason(Enum):
    UNSPECIFIED = 0
    RETIREMENT = 1
    DEATH = 2
    WITHDRAWAL = 3


# --- money -------------------------------------------------------------------------------------

_YUAN = re.compile(r"-?[0-9]+(\.[0-9]{1,2})?")


def fen(yuan: str | int | Decimal) -> int:
    """Fen from an amount in yuan given exactly: fen("12.5") == 1250, fen(3) == 300.

    Floats are refused on purpose (0.1 + 0.2 is not 0.3 in binary); so are fractions of a fen.
    """
    if isinstance(yuan, bool | float):
        raise TypeError("give yuan as a str, int or Decimal, never a float")
    if isinstance(yuan, int):
        return yuan * 100
    if isinstance(yuan, str):
        if not _YUAN.fullmatch(yuan.strip()):
            raise ValueError(f"not an amount in yuan with at most 2 decimals: {yuan!r}")
        yuan = Decimal(yuan.strip())
    try:
        scaled = yuan * 100
    except InvalidOperation as error:  # pragma: no cover - Decimal traps are off by default
        raise ValueError(f"not an amount: {yuan!r}") from error
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{yuan} yuan is not a whole number of fen")
    return int(scaled)


def yuan(amount_fen: int) -> str:
    """An amount of fen in yuan for people: yuan(123456) == "1,234.56"."""
    sign = "-" if amount_fen < 0 else ""
    whole, cents = divmod(abs(amount_fen), 100)
    return f"{sign}{whole:,}.{cents:02d}"


def check_fen(name: str, value: int) -> int:
    """Refuses a non-int amount early (a float or a Decimal would silently lose fen)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int of fen, not {type(value).__name__}")
    return value


def new_idempotency_key(prefix: str = "") -> str:
    """A fresh key for one business operation: `prefix` (up to 31 characters) and 32 hex digits.

    Create it once, before the first attempt, and keep it (persist it, if the operation must
    survive a crash of the caller): every resend of that operation must carry the same key.
    """
    if len(prefix) > 31:
        raise ValueError("an idempotency key prefix is at most 31 characters")
    return f"{prefix}{uuid.uuid4().hex}"


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthorizationLine:
    """One line of a basket: a catalog item, how many, and the line's total in fen."""

    item_code: str
    quantity: int
    amount_fen: int

    def __post_init__(self) -> None:
        check_fen("amount_fen", self.amount_fen)
        if isinstance(self.quantity, bool) or not isinstance(self.quantity, int):
            raise TypeError("quantity must be an int")


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FundingPart:
    """The part of an authorization drawn from one relationship's quota."""

    relationship_id: str
    amount_fen: int


@dataclass(frozen=True, slots=True)
class LineResult:
    item_code: str
    approved: bool
    #: Why the line is not paid; None when it is.
    decline_reason: DeclineReason | None
    approved_amount_fen: int


@dataclass(frozen=True, slots=True)
class AuthorizeResult:
    """The answer to Authorize. A business refusal is a result with `decision` DECLINED and a
    `decline_reason`, not an exception."""

    authorization_id: str
    decision: Decision
    #: Why the whole authorization is declined; None unless `decision` is DECLINED.
    decline_reason: DeclineReason | None
    approved_amount_fen: int
    line_results: tuple[LineResult, ...]
    funding: tuple[FundingPart, ...]
    #: What the beneficiary may still draw on, across their quotas, after this authorization.
    remaining_quota_fen: int
    expires_at: datetime | None
    status: AuthorizationStatus
    #: The key this authorization was sent with (keep it to resend the same operation).
    idempotency_key: str

    @property
    def approved(self) -> bool:
        """True when some money is approved (APPROVED or PARTIALLY_APPROVED)."""
        return self.decision in (Decision.APPROVED, Decision.PARTIALLY_APPROVED)


@dataclass(frozen=True, slots=True)
class Authorization:
    """The state of one authorization (after Capture, Void, Refund or GetAuthorization)."""

    authorization_id: str
    merchant_id: str
    beneficiary_id: str
    purpose: Purpose
    status: AuthorizationStatus
    approved_amount_fen: int
    captured_amount_fen: int
    refunded_amount_fen: int
    # as approved (the hold's parts); captured_funding: what the capture drew
    funding: tuple[FundingPart, ...]
    created_at: datetime | None
    expires_at: datetime | None
    captured_funding: tuple[FundingPart, ...] = ()
    captured_at: datetime | None = None

    @property
    def refundable_fen(self) -> int:
        return self.captured_amount_fen - self.refunded_amount_fen


@dataclass(frozen=True, slots=True)
class RefundPart:
    relationship_id: str
    amount_fen: int
    #: True when the money went to the holder's personal account (relationship no longer active).
    to_personal_account: bool


@dataclass(frozen=True, slots=True)
class RefundResult:
    authorization: Authorization
    parts: tuple[RefundPart, ...]


@dataclass(frozen=True, slots=True)
class Relationship:
    relationship_id: str
    holder_id: str
    beneficiary_id: str
    relation: Relation
    status: RelationshipStatus
    #: allocated_fen == available_fen + held_fen + spent_fen
    allocated_fen: int
    available_fen: int
    held_fen: int
    spent_fen: int
    holder_consented: bool
    beneficiary_consented: bool
    created_at: datetime | None
    activated_at: datetime | None
    dissolved_at: datetime | None
    #: None unless dissolved.
    dissolution_reason: DissolutionReason | None
    created_channel: Channel


@dataclass(frozen=True, slots=True)
class QuotaMoveResult:
    """The answer to AllocateQuota and ReleaseQuota."""

    relationship: Relationship
    holder_balance_fen: int


@dataclass(frozen=True, slots=True)
class DissolveResult:
    relationship: Relationship
    #: Unused quota (available plus voided holds) returned to the holder.
    returned_fen: int


@dataclass(frozen=True, slots=True)
class RelationshipPage:
    relationships: tuple[Relationship, ...]
    #: Empty on the last page.
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Participant:
    participant_id: str
    scheme: Scheme
    pooling_region: str
    status: ParticipantStatus
    balance_fen: int
    updated_at: datetime | None


@dataclass(frozen=True, slots=True)
class UpsertParticipantResult:
    participant: Participant
    #: False when the participant already existed with the same scheme and region.
    created: bool


@dataclass(frozen=True, slots=True)
class CreditResult:
    balance_fen: int
    ledger_entry_id: int


@dataclass(frozen=True, slots=True)
class InsuranceEventResult:
    participant: Participant
    dissolved_relationship_ids: tuple[str, ...]
    returned_fen: int


@dataclass(frozen=True, slots=True)
class Merchant:
    merchant_id: str
    kind: MerchantKind
    pooling_region: str
    #: Designated (定点) by the medical insurance agency; only designated merchants may charge.
    designated: bool = True
    name: str = ""


@dataclass(frozen=True, slots=True)
class CatalogItem:
    item_code: str
    category: ItemCategory
    #: Payable from a shared quota at a pharmacy (DRUG, DEVICE, CONSUMABLE only).
    eligible: bool
    name: str = ""
