"""RegistryService handlers (admin principal)."""

from __future__ import annotations

from typing import Any

import grpc

from authz_server.domain import validation
from authz_server.domain.model import CatalogItem, Merchant
from authz_server.domain.types import (
    InsuranceEventType,
    ItemCategory,
    MerchantKind,
    Scheme,
    TerminationReason,
)
from authz_server.generated.medwallet.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from authz_server.server import convert
from authz_server.server.auth import Authenticator, PrincipalKind
from authz_server.server.errors import mapped
from authz_server.service.idempotency import Idempotency
from authz_server.service.registry import CreditResult, InsuranceEvent, RegistryService

Context = grpc.aio.ServicerContext[Any, Any]


def _encode_credit(result: CreditResult) -> bytes:
    return registry_pb2.CreditPersonalAccountResponse(
        balance_fen=result.balance_fen, ledger_entry_id=result.ledger_entry_id
    ).SerializeToString()


class RegistryHandler(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, service: RegistryService, auth: Authenticator) -> None:
        self.service = service
        self.auth = auth

    @mapped
    async def UpsertParticipant(
        self, request: registry_pb2.UpsertParticipantRequest, context: Context
    ) -> registry_pb2.UpsertParticipantResponse:
        self.auth.require(context, PrincipalKind.ADMIN)
        participant_id = validation.identifier("participant_id", request.participant_id)
        scheme = convert.domain_enum("scheme", common_pb2.Scheme, "SCHEME", request.scheme, Scheme)
        region = validation.pooling_region("pooling_region", request.pooling_region)
        record, created = await self.service.upsert_participant(participant_id, scheme, region)
        return registry_pb2.UpsertParticipantResponse(
            participant=convert.participant(record), created=created
        )

    @mapped
    async def GetParticipant(
        self, request: registry_pb2.GetParticipantRequest, context: Context
    ) -> registry_pb2.GetParticipantResponse:
        self.auth.require(context, PrincipalKind.ADMIN)
        participant_id = validation.identifier("participant_id", request.participant_id)
        record = await self.service.get_participant(participant_id)
        return registry_pb2.GetParticipantResponse(participant=convert.participant(record))

    @mapped
    async def CreditPersonalAccount(
        self, request: registry_pb2.CreditPersonalAccountRequest, context: Context
    ) -> registry_pb2.CreditPersonalAccountResponse:
        self.auth.require(context, PrincipalKind.ADMIN)
        participant_id = validation.identifier("participant_id", request.participant_id)
        amount = validation.amount_fen("amount_fen", request.amount_fen)
        key = validation.idempotency_key("idempotency_key", request.idempotency_key)
        call = Idempotency("credit", key, convert.digest(request), _encode_credit)
        result = await self.service.credit_account(participant_id, amount, call)
        if isinstance(result, bytes):
            return registry_pb2.CreditPersonalAccountResponse.FromString(result)
        return registry_pb2.CreditPersonalAccountResponse.FromString(_encode_credit(result))

    @mapped
    async def ReportInsuranceEvent(
        self, request: registry_pb2.ReportInsuranceEventRequest, context: Context
    ) -> registry_pb2.ReportInsuranceEventResponse:
        self.auth.require(context, PrincipalKind.ADMIN)
        participant_id = validation.identifier("participant_id", request.participant_id)
        event_type = convert.domain_enum(
            "event_type",
            registry_pb2.InsuranceEventType,
            "INSURANCE_EVENT_TYPE",
            request.event_type,
            InsuranceEventType,
        )
        reason = None
        if event_type is InsuranceEventType.TERMINATED:
            reason = convert.domain_enum(
                "termination_reason",
                registry_pb2.TerminationReason,
                "TERMINATION_REASON",
                request.termination_reason,
                TerminationReason,
            )
        region = None
        if event_type is InsuranceEventType.TRANSFERRED or request.new_pooling_region:
            region = validation.pooling_region("new_pooling_region", request.new_pooling_region)
        scheme = None
        if request.new_scheme:
            scheme = convert.domain_enum(
                "new_scheme", common_pb2.Scheme, "SCHEME", request.new_scheme, Scheme
            )
        result = await self.service.report_event(
            InsuranceEvent(participant_id, event_type, reason, region, scheme)
        )
        return registry_pb2.ReportInsuranceEventResponse(
            participant=convert.participant(result.participant),
            dissolved_relationship_ids=result.dissolved_relationship_ids,
            returned_fen=result.returned_fen,
        )

    @mapped
    async def UpsertMerchant(
        self, request: registry_pb2.UpsertMerchantRequest, context: Context
    ) -> registry_pb2.UpsertMerchantResponse:
        self.auth.require(context, PrincipalKind.ADMIN)
        message = request.merchant
        merchant = Merchant(
            merchant_id=validation.identifier("merchant.merchant_id", message.merchant_id),
            kind=convert.domain_enum(
                "merchant.kind",
                common_pb2.MerchantKind,
                "MERCHANT_KIND",
                message.kind,
                MerchantKind,
            ),
            pooling_region=validation.pooling_region(
                "merchant.pooling_region", message.pooling_region
            ),
            designated=message.designated,
            name=validation.name("merchant.name", message.name),
        )
        await self.service.upsert_merchant(merchant)
        return registry_pb2.UpsertMerchantResponse(merchant=message)

    @mapped
    async def UpsertCatalogItems(
        self, request: registry_pb2.UpsertCatalogItemsRequest, context: Context
    ) -> registry_pb2.UpsertCatalogItemsResponse:
        self.auth.require(context, PrincipalKind.ADMIN)
        items = []
        for index, message in enumerate(request.items):
            field = f"items[{index}]"
            items.append(
                CatalogItem(
                    item_code=validation.identifier(f"{field}.item_code", message.item_code),
                    name=validation.name(f"{field}.name", message.name),
                    category=convert.domain_enum(
                        f"{field}.category",
                        common_pb2.ItemCategory,
                        "ITEM_CATEGORY",
                        message.category,
                        ItemCategory,
                    ),
                    eligible=message.eligible,
                )
            )
        count = await self.service.upsert_catalog_items(items)
        return registry_pb2.UpsertCatalogItemsResponse(upserted_count=count)
