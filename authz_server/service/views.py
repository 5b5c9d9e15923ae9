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
    funding: Funding
    created_at: datetime | None
    expires_at: datetime | None
