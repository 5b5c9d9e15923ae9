"""The payment rules of POLICY.md ("What the quota may pay for") and issue 3, without I/O.

What the quota itself decides (is there enough, which quotas fund it) happens atomically in
Redis (storage/redis/lua/authorize.lua); everything that can be decided from the request, the
merchant and the catalog is decided here first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from authz_server.domain import validation
from authz_server.domain.errors import InvalidArgument
from authz_server.domain.model import CatalogItem, Merchant
from authz_server.domain.types import DeclineReason, ItemCategory, MerchantKind, Purpose

MAX_LINES = 200
MAX_QUANTITY = 10_000
# Categories a pharmacy may charge to the quota: drugs, devices and consumables (not services).
PHARMACY_CATEGORIES = frozenset({ItemCategory.DRUG, ItemCategory.DEVICE, ItemCategory.CONSUMABLE})
PREMIUM_PURPOSES = frozenset({Purpose.RESIDENT_PREMIUM, Purpose.LTC_PREMIUM})
# Which kind of merchant may charge for which purpose.
MERCHANT_KIND_OF = {
    Purpose.MEDICAL_OUT_OF_POCKET: MerchantKind.MEDICAL_INSTITUTION,
    Purpose.PHARMACY: MerchantKind.RETAIL_PHARMACY,
    Purpose.RESIDENT_PREMIUM: MerchantKind.PREMIUM_COLLECTOR,
    Purpose.LTC_PREMIUM: MerchantKind.PREMIUM_COLLECTOR,
}


@dataclass(frozen=True)
class Line:
    item_code: str
    quantity: int
    amount_fen: int


@dataclass(frozen=True)
class LineResult:
    item_code: str
    approved: bool
    decline_reason: DeclineReason | None
    approved_amount_fen: int


@dataclass(frozen=True)
class AuthorizeRequest:
    idempotency_key: str
    merchant_id: str
    beneficiary_id: str
    relationship_id: str | None
    purpose: Purpose
    lines: tuple[Line, ...]
    amount_fen: int
    allow_partial: bool
    capture: bool

    @property
    def captures_at_once(self) -> bool:
        """Premiums are authorized and captured in one step, whatever the flag says."""
        return self.capture or self.purpose in PREMIUM_PURPOSES


@dataclass(frozen=True)
class Precheck:
    """What is known before the quota is consulted."""

    decline_reason: DeclineReason | None
    # The part of the amount that may be paid from the quota (ineligible lines removed).
    eligible_fen: int
    lines: tuple[LineResult, ...]


def check_request(request: AuthorizeRequest) -> None:
    """Shape rules; a violation is INVALID_ARGUMENT naming the field."""
    validation.amount_fen("amount_fen", request.amount_fen)
    if len(request.lines) > MAX_LINES:
        raise InvalidArgument("lines", f"at most {MAX_LINES} lines")
    for index, line in enumerate(request.lines):
        validation.identifier(f"lines[{index}].item_code", line.item_code)
        if not 1 <= line.quantity <= MAX_QUANTITY:
            raise InvalidArgument(f"lines[{index}].quantity", f"must be 1 to {MAX_QUANTITY}")
        validation.amount_fen(f"lines[{index}].amount_fen", line.amount_fen)
    if request.lines and sum(line.amount_fen for line in request.lines) != request.amount_fen:
        raise InvalidArgument("amount_fen", "must equal the sum of the lines' amount_fen")
    if request.purpose is Purpose.PHARMACY and not request.lines:
        raise InvalidArgument("lines", "are required for a pharmacy purchase")
    if request.purpose in PREMIUM_PURPOSES and request.allow_partial:
        raise InvalidArgument("allow_partial", "a premium is paid in full or not at all")


def precheck(
    request: AuthorizeRequest,
    merchant: Merchant | None,
    catalog: Mapping[str, CatalogItem],
) -> Precheck:
    """Merchant, purpose and items: the refusals that do not depend on the quota."""
    lines = tuple(LineResult(line.item_code, True, None, line.amount_fen) for line in request.lines)
    if merchant is None or not merchant.designated:
        return _declined(DeclineReason.MERCHANT_NOT_DESIGNATED, request)
    if MERCHANT_KIND_OF[request.purpose] is not merchant.kind:
        return _declined(DeclineReason.PURPOSE_NOT_ALLOWED, request)
    if request.purpose is Purpose.PHARMACY:
        lines = tuple(_pharmacy_line(line, catalog.get(line.item_code)) for line in request.lines)
    eligible = sum(line.approved_amount_fen for line in lines) if lines else request.amount_fen
    if eligible == 0:
        return Precheck(DeclineReason.ITEM_NOT_ELIGIBLE, 0, lines)
    if eligible < request.amount_fen and not request.allow_partial:
        # Ineligible lines are never paid; without partial approval the whole basket fails.
        return Precheck(DeclineReason.ITEM_NOT_ELIGIBLE, eligible, lines)
    return Precheck(None, eligible, lines)


def _pharmacy_line(line: Line, item: CatalogItem | None) -> LineResult:
    if item is None or not item.eligible or item.category not in PHARMACY_CATEGORIES:
        return LineResult(line.item_code, False, DeclineReason.ITEM_NOT_ELIGIBLE, 0)
    return LineResult(line.item_code, True, None, line.amount_fen)


def _declined(reason: DeclineReason, request: AuthorizeRequest) -> Precheck:
    lines = tuple(LineResult(line.item_code, False, reason, 0) for line in request.lines)
    return Precheck(reason, 0, lines)


def distribute(lines: Sequence[LineResult], approved_fen: int) -> tuple[LineResult, ...]:
    """Spreads an approved total over the eligible lines in order (partial approval pays the
    first lines in full, then part of the next; the rest are not paid from the quota)."""
    left = approved_fen
    result = []
    for line in lines:
        if not line.approved:
            result.append(line)
            continue
        paid = min(left, line.approved_amount_fen)
        left -= paid
        if paid:
            result.append(LineResult(line.item_code, True, None, paid))
        else:
            result.append(LineResult(line.item_code, False, DeclineReason.INSUFFICIENT_QUOTA, 0))
    return tuple(result)


def hold_seconds(purpose: Purpose, pharmacy_seconds: int, medical_seconds: int) -> int:
    """How long a hold lasts before it returns to the quota by itself."""
    return pharmacy_seconds if purpose is Purpose.PHARMACY else medical_seconds
