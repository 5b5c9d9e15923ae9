"""The domain's vocabulary. Member names equal the proto enum value names minus their prefix."""

from __future__ import annotations

from enum import StrEnum


class Scheme(StrEnum):
    EMPLOYEE = "EMPLOYEE"
    RESIDENT = "RESIDENT"


class ParticipantStatus(StrEnum):
    ACTIVE = "ACTIVE"
    TERMINATED = "TERMINATED"


class MerchantKind(StrEnum):
    MEDICAL_INSTITUTION = "MEDICAL_INSTITUTION"
    RETAIL_PHARMACY = "RETAIL_PHARMACY"
    PREMIUM_COLLECTOR = "PREMIUM_COLLECTOR"


class ItemCategory(StrEnum):
    DRUG = "DRUG"
    DEVICE = "DEVICE"
    CONSUMABLE = "CONSUMABLE"
    MEDICAL_SERVICE = "MEDICAL_SERVICE"


class Relation(StrEnum):
    SPOUSE = "SPOUSE"
    PARENT = "PARENT"
    CHILD = "CHILD"
    SIBLING = "SIBLING"
    GRANDPARENT = "GRANDPARENT"
    GRANDCHILD = "GRANDCHILD"
    OTHER = "OTHER"


class Party(StrEnum):
    HOLDER = "HOLDER"
    BENEFICIARY = "BENEFICIARY"


class RelationshipStatus(StrEnum):
    PENDING_CONSENT = "PENDING_CONSENT"
    ACTIVE = "ACTIVE"
    DISSOLVED = "DISSOLVED"


class DissolutionReason(StrEnum):
    VOLUNTARY = "VOLUNTARY"
    HOLDER_TERMINATED = "HOLDER_TERMINATED"
    BENEFICIARY_TERMINATED = "BENEFICIARY_TERMINATED"
    HOLDER_TRANSFERRED = "HOLDER_TRANSFERRED"
    BENEFICIARY_TRANSFERRED = "BENEFICIARY_TRANSFERRED"


class Channel(StrEnum):
    APP = "APP"
    PROVINCIAL_PLATFORM = "PROVINCIAL_PLATFORM"
    SERVICE_WINDOW = "SERVICE_WINDOW"


class InsuranceEventType(StrEnum):
    TERMINATED = "TERMINATED"
    TRANSFERRED = "TRANSFERRED"
    REINSTATED = "REINSTATED"


class TerminationReason(StrEnum):
    RETIREMENT = "RETIREMENT"
    DEATH = "DEATH"
    WITHDRAWAL = "WITHDRAWAL"


class LedgerKind(StrEnum):
    """Every movement of money has one ledger row of one of these kinds (amounts are positive)."""

    ACCOUNT_CREDIT = "ACCOUNT_CREDIT"  # provincial system -> personal account
    QUOTA_ALLOCATION = "QUOTA_ALLOCATION"  # personal account -> quota
    QUOTA_RELEASE = "QUOTA_RELEASE"  # quota -> personal account, asked for by the holder
    DISSOLUTION_RETURN = "DISSOLUTION_RETURN"  # quota -> personal account, on dissolution
    CAPTURE = "CAPTURE"  # quota -> merchant
    REFUND_TO_QUOTA = "REFUND_TO_QUOTA"  # merchant -> quota
    REFUND_TO_ACCOUNT = "REFUND_TO_ACCOUNT"  # merchant -> personal account (quota dissolved)


class Purpose(StrEnum):
    MEDICAL_OUT_OF_POCKET = "MEDICAL_OUT_OF_POCKET"
    PHARMACY = "PHARMACY"
    RESIDENT_PREMIUM = "RESIDENT_PREMIUM"
    LTC_PREMIUM = "LTC_PREMIUM"


class Decision(StrEnum):
    APPROVED = "APPROVED"
    PARTIALLY_APPROVED = "PARTIALLY_APPROVED"
    DECLINED = "DECLINED"


class DeclineReason(StrEnum):
    RELATIONSHIP_NOT_FOUND = "RELATIONSHIP_NOT_FOUND"
    RELATIONSHIP_NOT_ACTIVE = "RELATIONSHIP_NOT_ACTIVE"
    INSUFFICIENT_QUOTA = "INSUFFICIENT_QUOTA"
    ITEM_NOT_ELIGIBLE = "ITEM_NOT_ELIGIBLE"
    PURPOSE_NOT_ALLOWED = "PURPOSE_NOT_ALLOWED"
    MERCHANT_NOT_DESIGNATED = "MERCHANT_NOT_DESIGNATED"
    BENEFICIARY_NOT_ELIGIBLE = "BENEFICIARY_NOT_ELIGIBLE"
    # An earlier call with the key placed a hold never confirmed to anybody (its journal row
    # never committed), released after MEDWALLET_ABANDONED_HOLD_SECONDS
    # (runtime/release_abandoned_holds.py); the till authorizes again with a new key.
    HOLD_ABANDONED = "HOLD_ABANDONED"


class AuthorizationStatus(StrEnum):
    PENDING = "PENDING"
    CAPTURED = "CAPTURED"
    VOIDED = "VOIDED"
    EXPIRED = "EXPIRED"
    DECLINED = "DECLINED"
