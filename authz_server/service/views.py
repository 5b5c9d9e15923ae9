"""What the authorization services answer with, shared by the service and its capture writer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from authz_server.domain.funding import Funding
from authz_server.domain.types import AuthorizationStatus, Purpose


@dataclass(frozen=True)
class AuthorizationView:
    authorization_id: str
    merchant_id: str
    beneficiary_id: str
    purpose: Purpose
    status: AuthorizationStatus
    approved_fen: int
    captured_fen: int
    refunded_fen: int
    # The hold's parts, as approved (relationship, fen) in funding order.
    funding: Funding
    created_at: datetime | None
    expires_at: datetime | None
    # What the capture drew from each relationship, in funding order; empty until captured.
    captured_funding: Funding = ()
    captured_at: datetime | None = None
