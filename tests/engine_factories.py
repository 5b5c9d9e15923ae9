"""Builders for the authorization engine's tests: merchants, catalog items, requests."""

from __future__ import annotations

from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.harness import ADMIN, bearer, new_id

HOSPITAL = "merchant-a"  # test-merchant-a token
PHARMACY = "merchant-b"  # test-merchant-b token
HOSPITAL_TOKEN = bearer("test-merchant-a")
PHARMACY_TOKEN = bearer("test-merchant-b")


def merchant(
    registry: registry_pb2_grpc.RegistryServiceStub,
    merchant_id: str,
    kind: int,
    designated: bool = True,
    region: str = "440300",
) -> None:
    registry.UpsertMerchant(
        registry_pb2.UpsertMerchantRequest(
            merchant=registry_pb2.Merchant(
                merchant_id=merchant_id,
                kind=kind,
                pooling_region=region,
                designated=designated,
                name=merchant_id,
            )
        ),
        metadata=ADMIN,
    )


def items(registry: registry_pb2_grpc.RegistryServiceStub) -> dict[str, str]:
    """Fresh catalog items: an eligible drug, device and consumable, an ineligible one, and a
    medical service (never payable at a pharmacy). Returns kind -> item code."""
    codes = {kind: new_id(kind) for kind in ("drug", "device", "consumable", "cosmetic", "service")}
    registry.UpsertCatalogItems(
        registry_pb2.UpsertCatalogItemsRequest(
            items=[
                registry_pb2.CatalogItem(
                    item_code=codes["drug"], category=common_pb2.ITEM_CATEGORY_DRUG, eligible=True
                ),
                registry_pb2.CatalogItem(
                    item_code=codes["device"],
                    category=common_pb2.ITEM_CATEGORY_DEVICE,
                    eligible=True,
                ),
                registry_pb2.CatalogItem(
                    item_code=codes["consumable"],
                    category=common_pb2.ITEM_CATEGORY_CONSUMABLE,
                    eligible=True,
                ),
                registry_pb2.CatalogItem(
                    item_code=codes["cosmetic"],
                    category=common_pb2.ITEM_CATEGORY_CONSUMABLE,
                    eligible=False,
                ),
                registry_pb2.CatalogItem(
                    item_code=codes["service"],
                    category=common_pb2.ITEM_CATEGORY_MEDICAL_SERVICE,
                    eligible=True,
                ),
            ]
        ),
        metadata=ADMIN,
    )
    return codes


def medical(
    beneficiary_id: str, amount_fen: int, **fields: object
) -> authorization_pb2.AuthorizeRequest:
    return authorization_pb2.AuthorizeRequest(
        idempotency_key=new_id("auth"),
        beneficiary_id=beneficiary_id,
        purpose=common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET,
        amount_fen=amount_fen,
        **fields,  # type: ignore[arg-type]
    )
