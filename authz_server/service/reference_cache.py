"""Merchants and the item catalog in memory, so Authorize needs no SQL.

Loaded at start; refreshed from rows changed since the last look (every REFRESH_SECONDS, so
other worker processes see an upsert within that time); the process that takes an upsert
applies it at once.

"Changed since" means updated at most LOOKBACK_SECONDS before the previous refresh began, not
after the newest row seen. A row's updated_at is its writer's clock when it wrote the row, not
when the row became visible: a transaction that stamps its row and commits a moment later,
after another writer's newer row was already read, would otherwise never be seen by this
process (a merchant's designation revoked through one worker, still honoured by another until
restart). A row becomes visible within LOOKBACK_SECONDS of its stamp, so one that was not
visible at the previous refresh is stamped after that refresh began less LOOKBACK_SECONDS.
Rows read again are applied again, which changes nothing; a bulk load is read again for that
long, then no more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.model import CatalogItem, Merchant
from authz_server.domain.types import ItemCategory, MerchantKind
from authz_server.storage.sql.database import Database
from authz_server.storage.sql.tables import CatalogItemRow, MerchantRow

log = logging.getLogger(__name__)
REFRESH_SECONDS = 2.0
# Longer than any write of these rows takes from its timestamp to its commit, plus the clock
# skew between the hosts of the workers.
LOOKBACK_SECONDS = 60.0


# The columns of a merchant the cache keeps.
_MERCHANT_COLUMNS = select(
    MerchantRow.merchant_id,
    MerchantRow.kind,
    MerchantRow.pooling_region,
    MerchantRow.designated,
    MerchantRow.name,
)


def _merchant(row: Any) -> Merchant:
    return Merchant(
        row.merchant_id, MerchantKind(row.kind), row.pooling_region, row.designated, row.name
    )


class ReferenceCache:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.merchants: dict[str, Merchant] = {}
        self.catalog: dict[str, CatalogItem] = {}
        # When the previous refresh began (this process's clock); None: none yet, read all.
        self.refreshed_at: datetime | None = None
        self.task: asyncio.Task[None] | None = None

    def put_merchant(self, merchant: Merchant) -> None:
        self.merchants[merchant.merchant_id] = merchant

    def put_items(self, items: Iterable[CatalogItem]) -> None:
        for item in items:
            self.catalog[item.item_code] = item

    async def refresh(self) -> None:
        began = datetime.now(UTC)
        since = None
        if self.refreshed_at is not None:
            since = self.refreshed_at - timedelta(seconds=LOOKBACK_SECONDS)
        merchants, items = await self.database.run(partial(self._changed, since=since))
        self.refreshed_at = began
        for merchant_row in merchants:
            self.put_merchant(_merchant(merchant_row))
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

    async def merchant(self, merchant_id: str) -> Merchant | None:
        """The merchant, read from SQL when this process has not seen it yet (another worker
        took its upsert since the last refresh): for what is written to the ledger (a
        capture's merchant region), where a miss must not stand for "no such merchant"."""
        known = self.merchants.get(merchant_id)
        if known is not None:
            return known

        def read(session: Session) -> Any:
            return session.execute(
                _MERCHANT_COLUMNS.where(MerchantRow.merchant_id == merchant_id)
            ).one_or_none()

        row = await self.database.run(read)
        if row is None:
            return None
        found = _merchant(row)
        self.put_merchant(found)
        return found

    def _changed(self, session: Session, *, since: datetime | None) -> tuple[list[Any], list[Any]]:
        # Plain rows of the columns the cache keeps, not ORM objects: a bulk-loaded catalog is
        # read again for LOOKBACK_SECONDS, and that should cost little.
        merchants = _MERCHANT_COLUMNS
        items = select(
            CatalogItemRow.item_code,
            CatalogItemRow.name,
            CatalogItemRow.category,
            CatalogItemRow.eligible,
        )
        if since is not None:
            merchants = merchants.where(MerchantRow.updated_at >= since)
            items = items.where(CatalogItemRow.updated_at >= since)
        return list(session.execute(merchants)), list(session.execute(items))

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
