"""Merchants and the item catalog in memory, so Authorize needs no SQL.

Loaded at start; refreshed from rows changed since the last look (every REFRESH_SECONDS, so
other worker processes see an upsert within that time); the process that takes an upsert
applies it at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.model import CatalogItem, Merchant
from authz_server.domain.types import ItemCategory, MerchantKind
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import CatalogItemRow, MerchantRow

log = logging.getLogger(__name__)
REFRESH_SECONDS = 2.0


class ReferenceCache:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.merchants: dict[str, Merchant] = {}
        self.catalog: dict[str, CatalogItem] = {}
        self.seen_merchants: datetime | None = None
        self.seen_items: datetime | None = None
        self.task: asyncio.Task[None] | None = None

    def put_merchant(self, merchant: Merchant) -> None:
        self.merchants[merchant.merchant_id] = merchant

    def put_items(self, items: Iterable[CatalogItem]) -> None:
        for item in items:
            self.catalog[item.item_code] = item

    async def refresh(self) -> None:
        merchants, items = await self.database.run(self._changed)
        for merchant_row in merchants:
            self.put_merchant(
                Merchant(
                    merchant_row.merchant_id,
                    MerchantKind(merchant_row.kind),
                    merchant_row.pooling_region,
                    merchant_row.designated,
                    merchant_row.name,
                )
            )
            self.seen_merchants = max(
                self.seen_merchants or merchant_row.updated_at, merchant_row.updated_at
            )
        for item_row in items:
            self.put_items(
                [
                    CatalogItem(
                        item_row.item_code,
                        item_row.name,
                        ItemCategory(item_row.category),
                        item_row.eligible,
                    )
                ]
            )
            self.seen_items = max(self.seen_items or item_row.updated_at, item_row.updated_at)

    def _changed(self, session: Session) -> tuple[list[MerchantRow], list[CatalogItemRow]]:
        # Strictly newer than the last row seen: rows bulk-loaded in one instant are read once,
        # not on every refresh. (A row another process writes in the very microsecond of the
        # last one seen would be missed until restart; upserts through this process are put
        # in the cache directly.)
        merchants = select(MerchantRow)
        if self.seen_merchants is not None:
            merchants = merchants.where(MerchantRow.updated_at > self.seen_merchants)
        items = select(CatalogItemRow)
        if self.seen_items is not None:
            items = items.where(CatalogItemRow.updated_at > self.seen_items)
        return list(session.scalars(merchants)), list(session.scalars(items))

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="reference-cache")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh()
            except Exception:
                log.exception("reference cache refresh failed; keeping what it has")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
