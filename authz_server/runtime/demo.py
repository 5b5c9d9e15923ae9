"""Demo data so a new user can try a call at once: people, a sharing relationship with quota,
merchants of each kind, catalog items, and one token per principal. Loading twice is harmless."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from authz_server.domain.model import CatalogItem, Merchant
from authz_server.domain.types import (
    Channel,
    ItemCategory,
    MerchantKind,
    Party,
    Relation,
    Scheme,
)
from authz_server.server.tokens import hashed_file
from authz_server.service.idempotency import Idempotency
from authz_server.service.registry import RegistryService
from authz_server.service.relationships import RelationshipService

DEMO_TOKENS: dict[str, dict[str, str]] = {
    "demo-admin": {"kind": "admin"},
    "demo-app": {"kind": "channel", "channel": Channel.APP.value},
    "demo-platform": {"kind": "channel", "channel": Channel.PROVINCIAL_PLATFORM.value},
    "demo-window": {"kind": "channel", "channel": Channel.SERVICE_WINDOW.value},
    "demo-hospital": {"kind": "merchant", "merchant_id": "hospital-440300-1"},
    "demo-pharmacy": {"kind": "merchant", "merchant_id": "pharmacy-440300-1"},
    "demo-collector": {"kind": "merchant", "merchant_id": "collector-440300-1"},
}

MERCHANTS = [
    Merchant("hospital-440300-1", MerchantKind.MEDICAL_INSTITUTION, "440300", True, "市人民医院"),
    Merchant("pharmacy-440300-1", MerchantKind.RETAIL_PHARMACY, "440300", True, "深圳大药房"),
    Merchant("collector-440300-1", MerchantKind.PREMIUM_COLLECTOR, "440300", True, "深圳市医保局"),
]

ITEMS = [
    CatalogItem("drug-amoxicillin", "阿莫西林胶囊", ItemCategory.DRUG, True),
    CatalogItem("device-glucometer", "血糖仪", ItemCategory.DEVICE, True),
    CatalogItem("consumable-bandage", "医用绷带", ItemCategory.CONSUMABLE, True),
    CatalogItem("cosmetic-face-cream", "护肤霜", ItemCategory.CONSUMABLE, False),
]

HOLDER = "demo-holder-zhang"  # an employee in Beijing
RELATIVE = "demo-parent-li"  # a resident in Shenzhen, 2,000 km away
SPOUSE = "demo-spouse-wang"  # an employee in Chengdu


def write_tokens(path: Path) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(hashed_file(DEMO_TOKENS), indent=2) + "\n")  # digests only


def _no_encode(_: object) -> bytes:
    return b""


async def load(registry: RegistryService, relationships: RelationshipService) -> str:
    """Loads the demo data; returns the id of the demo relationship (holder -> parent)."""
    for participant_id, scheme, region in (
        (HOLDER, Scheme.EMPLOYEE, "110100"),
        (RELATIVE, Scheme.RESIDENT, "440300"),
        (SPOUSE, Scheme.EMPLOYEE, "510100"),
    ):
        await registry.upsert_participant(participant_id, scheme, region)
    await registry.credit_account(
        HOLDER, 1_000_000, Idempotency("credit", "demo-credit-1", "demo", _no_encode)
    )
    for merchant in MERCHANTS:
        await registry.upsert_merchant(merchant)
    await registry.upsert_catalog_items(ITEMS)
    existing, _ = await relationships.list(HOLDER, None, 100, "")
    for view in existing:
        if view.relationship.beneficiary_id == RELATIVE and view.relationship.dissolved_at is None:
            return view.relationship.relationship_id
    view = await relationships.propose(HOLDER, RELATIVE, Relation.PARENT, Channel.APP)
    relationship_id = view.relationship.relationship_id
    await relationships.consent(relationship_id, Party.HOLDER, Channel.APP)
    await relationships.consent(relationship_id, Party.BENEFICIARY, Channel.APP)
    await relationships.allocate(
        relationship_id,
        200_000,
        Idempotency("allocate", f"demo-allocate-{relationship_id}", "demo", _no_encode),
        Channel.APP,
    )
    return relationship_id


def token_roles() -> list[str]:
    """Each demo token with what it may do (one line each)."""
    kinds = {merchant.merchant_id: merchant.kind for merchant in MERCHANTS}
    lines = []
    for token, principal in DEMO_TOKENS.items():
        if principal["kind"] == "admin":
            role = "RegistryService and SettlementService (admin)"
        elif principal["kind"] == "channel":
            role = f"RelationshipService, as channel {principal['channel']}"
        else:
            merchant_id = principal["merchant_id"]
            role = f"AuthorizationService, its own payments as {merchant_id}"
            role += f" ({kinds[merchant_id].value.lower().replace('_', ' ')})"
        lines.append(f"{token:<15} {role}")
    return lines


def instructions(port: int, relationship_id: str, command: str = "medwallet-authz") -> str:
    """The calls to paste: each Authorize sends a fresh idempotency key (--fresh-key), so pasting
    it again is a new payment, never a replay of a stored answer."""
    basket = json.dumps(
        {
            "beneficiary_id": RELATIVE,
            "purpose": "PURPOSE_PHARMACY",
            "amount_fen": 3500,
            "allow_partial": True,
            "lines": [
                {"item_code": "drug-amoxicillin", "quantity": 1, "amount_fen": 2500},
                {"item_code": "cosmetic-face-cream", "quantity": 1, "amount_fen": 1000},
            ],
        },
        ensure_ascii=False,
    )
    tokens = "\n".join(f"  {line}" for line in token_roles())
    return f"""
MedWallet AuthZ is serving on localhost:{port} with demo data: holder {HOLDER} (Beijing)
shares 2,000.00 yuan of quota with {RELATIVE} (Shenzhen), relationship {relationship_id}.
Demo tokens (--token) and what each may do:
{tokens}

In another terminal (each line may be pasted again and again; --fresh-key sends a new
idempotency_key each time, so every paste is a new payment; sending a key already used instead
answers the first call's stored answer again, a replay, whatever happened to it since):

  # a pharmacy basket with an ineligible item: the drug is approved, the face cream is not
  {command} call AuthorizationService/Authorize '{basket}' \\
      --fresh-key --token demo-pharmacy --port {port}
  # then capture it: put the authorization_id it answered in place of AUTHORIZATION_ID
  {command} call AuthorizationService/Capture '{{"authorization_id": "AUTHORIZATION_ID"}}' \\
      --fresh-key --token demo-pharmacy --port {port}
  {command} call RelationshipService/GetRelationship \\
      '{{"relationship_id": "{relationship_id}"}}' --token demo-app --port {port}
  {command} call --list    # every RPC; errors show the ErrorInfo reason and field
"""


def print_instructions(port: int, relationship_id: str) -> None:
    # The command as this process was started (e.g. .venv/bin/medwallet-authz), so the lines
    # work as pasted even when the virtualenv is not activated.
    command = sys.argv[0] if "/" in sys.argv[0] else "medwallet-authz"
    if command.endswith(".py"):
        command = "medwallet-authz"
    print(instructions(port, relationship_id, command), flush=True)
