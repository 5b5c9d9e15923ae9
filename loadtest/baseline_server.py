"""The baseline a team might build instead: the same AuthorizationService contract (Authorize,
Capture) on grpc.aio, with the quota in PostgreSQL through SQLAlchemy, one transaction per call
and `SELECT ... FOR UPDATE` on the quota rows.

It reuses the service's own request rules (authz_server.domain.authorization: validation,
merchant and catalog precheck, line distribution), its tokens file and its merchant/catalog
data (in memory, as the service keeps them), so the difference measured is the storage design.

Authorize: BEGIN; look up (merchant, idempotency key); lock the beneficiary's active quotas in
funding order; choose the funding as the service documents it (the first quota that covers the
amount, else a split in order); UPDATE the quotas; INSERT the authorization; COMMIT.
Capture: BEGIN; lock the authorization; UPDATE its quotas (held -> captured, the rest back to
available); UPDATE the authorization; COMMIT.

    python -m loadtest.baseline_server --port 50070 --workers 2 \
        --database-url postgresql+psycopg://postgres@127.0.0.1/bench --schema bl_x \
        --tokens tokens.json --merchants merchants.csv --items items.csv
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from authz_server.domain import authorization as rules
from authz_server.domain.errors import DomainError
from authz_server.domain.model import CatalogItem, Merchant
from authz_server.domain.types import DeclineReason, ItemCategory, MerchantKind, Purpose
from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
)
from authz_server.runtime import event_loop
from authz_server.server import convert
from authz_server.server.auth import Authenticator, PrincipalKind
from loadtest import dataset
from loadtest.generic_only import GenericOnly
from loadtest.processes import run_workers

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
HOLD_SECONDS = 900
POOL_SIZE = 16

SCHEMA = """
CREATE TABLE quotas (
    relationship_id text PRIMARY KEY,
    beneficiary_id text NOT NULL,
    holder_id text NOT NULL,
    funding_order bigint NOT NULL,
    status text NOT NULL,
    allocated_fen bigint NOT NULL,
    available_fen bigint NOT NULL CHECK (available_fen >= 0),
    held_fen bigint NOT NULL DEFAULT 0 CHECK (held_fen >= 0),
    captured_fen bigint NOT NULL DEFAULT 0
);
CREATE INDEX quotas_beneficiary ON quotas (beneficiary_id, funding_order);
CREATE TABLE authorizations (
    authorization_id text PRIMARY KEY,
    merchant_id text NOT NULL,
    idempotency_key text NOT NULL,
    request_digest text NOT NULL,
    beneficiary_id text NOT NULL,
    purpose text NOT NULL,
    decision text NOT NULL,
    decline_reason text,
    approved_fen bigint NOT NULL,
    funding text NOT NULL,
    status text NOT NULL,
    captured_fen bigint NOT NULL DEFAULT 0,
    capture_key text,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    UNIQUE (merchant_id, idempotency_key)
);
"""

LOCK_QUOTAS = text(
    "SELECT relationship_id, available_fen FROM quotas"
    " WHERE beneficiary_id = :beneficiary AND status = 'ACTIVE'"
    " ORDER BY funding_order FOR UPDATE"
)
FIND_KEY = text(
    "SELECT authorization_id FROM authorizations"
    " WHERE merchant_id = :merchant AND idempotency_key = :key"
)
HOLD = text(
    "UPDATE quotas SET available_fen = available_fen - :fen, held_fen = held_fen + :fen"
    " WHERE relationship_id = :rid"
)
INSERT = text(
    "INSERT INTO authorizations (authorization_id, merchant_id, idempotency_key,"
    " request_digest, beneficiary_id, purpose, decision, decline_reason, approved_fen, funding,"
    " status, created_at, expires_at) VALUES (:id, :merchant, :key, :digest, :beneficiary,"
    " :purpose, :decision, :reason, :approved, :funding, :status, :created, :expires)"
)
LOCK_AUTHORIZATION = text(
    "SELECT merchant_id, beneficiary_id, purpose, status, approved_fen, funding, created_at,"
    " expires_at FROM authorizations WHERE authorization_id = :id FOR UPDATE"
)
SETTLE = text(
    "UPDATE quotas SET held_fen = held_fen - :part, captured_fen = captured_fen + :take,"
    " available_fen = available_fen + :part - :take WHERE relationship_id = :rid"
)
CAPTURED = text(
    "UPDATE authorizations SET status = 'CAPTURED', captured_fen = :fen, capture_key = :key"
    " WHERE authorization_id = :id"
)


def engine_for(url: str, schema: str, application_name: str) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=POOL_SIZE,
        max_overflow=0,
        connect_args={
            "options": f"-csearch_path={schema}",
            "application_name": application_name,
        },
    )


def _timestamp(moment: datetime | None) -> Any:
    return convert.timestamp(moment)


def _split(funding: list[tuple[str, int]], amount: int) -> list[tuple[str, int, int]]:
    left, parts = amount, []
    for relationship_id, part in funding:
        take = min(left, part)
        left -= take
        parts.append((relationship_id, part, take))
    return parts


class Baseline(authorization_pb2_grpc.AuthorizationServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        auth: Authenticator,
        merchants: dict[str, Merchant],
        catalog: dict[str, CatalogItem],
    ) -> None:
        self.engine = engine
        self.auth = auth
        self.merchants = merchants
        self.catalog = catalog

    def _merchant(self, context: Any) -> str:
        try:
            principal = self.auth.require(context, PrincipalKind.MERCHANT)
        except Exception as error:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, str(error)) from None
        assert principal.merchant_id is not None
        return principal.merchant_id

    async def Authorize(
        self, request: authorization_pb2.AuthorizeRequest, context: Any
    ) -> authorization_pb2.AuthorizeResponse:
        try:
            return await self._authorize(request, context)
        except _Abort as abort:
            await context.abort(abort.code, abort.message)
        except DomainError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        raise AssertionError("unreachable")

    async def _authorize(
        self, request: authorization_pb2.AuthorizeRequest, context: Any
    ) -> authorization_pb2.AuthorizeResponse:
        merchant_id = self._merchant(context)
        domain = rules.AuthorizeRequest(
            idempotency_key=request.idempotency_key,
            merchant_id=merchant_id,
            beneficiary_id=request.beneficiary_id,
            relationship_id=request.relationship_id or None,
            purpose=convert.domain_enum(
                "purpose", common_pb2.Purpose, "PURPOSE", request.purpose, Purpose
            ),
            lines=tuple(rules.Line(x.item_code, x.quantity, x.amount_fen) for x in request.lines),
            amount_fen=request.amount_fen,
            allow_partial=request.allow_partial,
            capture=request.capture,
        )
        rules.check_request(domain)
        precheck = rules.precheck(domain, self.merchants.get(merchant_id), self.catalog)
        digest = convert.digest(request)
        now = datetime.now(UTC)
        authorization_id = uuid.uuid4().hex
        reason = precheck.decline_reason
        funding: list[tuple[str, int]] = []
        remaining = 0
        async with self.engine.begin() as connection:
            earlier = await connection.execute(
                FIND_KEY, {"merchant": merchant_id, "key": domain.idempotency_key}
            )
            if earlier.first() is not None:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
            quotas = (
                await connection.execute(LOCK_QUOTAS, {"beneficiary": domain.beneficiary_id})
            ).all()
            available = [(row.relationship_id, row.available_fen) for row in quotas]
            remaining = sum(fen for _, fen in available)
            if reason is None and not available:
                reason = DeclineReason.RELATIONSHIP_NOT_FOUND
            if reason is None:
                need = precheck.eligible_fen
                single = next((rid for rid, fen in available if fen >= need), None)
                if single is not None:
                    funding = [(single, need)]
                else:
                    approved = need if remaining >= need else 0
                    if not approved and domain.allow_partial and remaining > 0:
                        approved = remaining
                    for rid, fen in available:
                        take = min(approved, fen)
                        if take:
                            funding.append((rid, take))
                            approved -= take
                if not funding:
                    reason = DeclineReason.INSUFFICIENT_QUOTA
            approved_fen = sum(fen for _, fen in funding)
            remaining -= approved_fen
            if funding:
                await connection.execute(HOLD, [{"fen": fen, "rid": rid} for rid, fen in funding])
            decision = (
                "DECLINED"
                if not funding
                else ("PARTIALLY_APPROVED" if approved_fen < domain.amount_fen else "APPROVED")
            )
            expires = now + timedelta(seconds=HOLD_SECONDS) if funding else None
            await connection.execute(
                INSERT,
                {
                    "id": authorization_id,
                    "merchant": merchant_id,
                    "key": domain.idempotency_key,
                    "digest": digest,
                    "beneficiary": domain.beneficiary_id,
                    "purpose": domain.purpose.value,
                    "decision": decision,
                    "reason": reason.value if reason and not funding else None,
                    "approved": approved_fen,
                    "funding": ";".join(f"{rid}={fen}" for rid, fen in funding),
                    "status": "PENDING" if funding else "DECLINED",
                    "created": now,
                    "expires": expires,
                },
            )
        lines = precheck.lines
        if funding:
            lines = rules.distribute(lines, approved_fen)
        D = authorization_pb2.DeclineReason
        return authorization_pb2.AuthorizeResponse(
            authorization_id=authorization_id,
            decision=authorization_pb2.Decision.Value(f"DECISION_{decision}"),
            decline_reason=convert.proto_enum(D, "DECLINE_REASON", reason if not funding else None),
            approved_amount_fen=approved_fen,
            line_results=[
                authorization_pb2.LineResult(
                    item_code=line.item_code,
                    approved=line.approved,
                    decline_reason=convert.proto_enum(D, "DECLINE_REASON", line.decline_reason),
                    approved_amount_fen=line.approved_amount_fen,
                )
                for line in lines
            ],
            funding=[
                authorization_pb2.FundingPart(relationship_id=rid, amount_fen=fen)
                for rid, fen in funding
            ],
            remaining_quota_fen=remaining,
            expires_at=_timestamp(expires),
            status=authorization_pb2.AUTHORIZATION_STATUS_PENDING
            if funding
            else authorization_pb2.AUTHORIZATION_STATUS_DECLINED,
        )

    async def Capture(
        self, request: authorization_pb2.CaptureRequest, context: Any
    ) -> authorization_pb2.CaptureResponse:
        try:
            return await self._capture(request, context)
        except _Abort as abort:
            await context.abort(abort.code, abort.message)
        raise AssertionError("unreachable")

    async def _capture(
        self, request: authorization_pb2.CaptureRequest, context: Any
    ) -> authorization_pb2.CaptureResponse:
        merchant_id = self._merchant(context)
        async with self.engine.begin() as connection:
            row = (
                await connection.execute(LOCK_AUTHORIZATION, {"id": request.authorization_id})
            ).first()
            if row is None or row.merchant_id != merchant_id:
                raise _Abort(grpc.StatusCode.NOT_FOUND, "authorization not found")
            if row.status != "PENDING":
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"ALREADY_{row.status}")
            amount = request.amount_fen or row.approved_fen
            if amount > row.approved_fen:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "amount_fen over the approved")
            funding = [
                (rid, int(fen))
                for rid, _, fen in (piece.partition("=") for piece in row.funding.split(";"))
            ]
            parts = _split(funding, amount)
            await connection.execute(
                SETTLE, [{"part": part, "take": take, "rid": rid} for rid, part, take in parts]
            )
            await connection.execute(
                CAPTURED,
                {"fen": amount, "key": request.idempotency_key, "id": request.authorization_id},
            )
        return authorization_pb2.CaptureResponse(
            authorization=authorization_pb2.Authorization(
                authorization_id=request.authorization_id,
                merchant_id=merchant_id,
                beneficiary_id=row.beneficiary_id,
                purpose=common_pb2.Purpose.Value(f"PURPOSE_{row.purpose}"),
                status=authorization_pb2.AUTHORIZATION_STATUS_CAPTURED,
                approved_amount_fen=row.approved_fen,
                captured_amount_fen=amount,
                funding=[
                    authorization_pb2.FundingPart(relationship_id=rid, amount_fen=fen)
                    for rid, fen in funding
                ],
                created_at=_timestamp(row.created_at),
                expires_at=_timestamp(row.expires_at),
            )
        )


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def reference_data(data_dir: Path) -> tuple[dict[str, Merchant], dict[str, CatalogItem]]:
    merchants = {
        row["merchant_id"]: Merchant(
            row["merchant_id"],
            MerchantKind(row["kind"]),
            row["pooling_region"],
            row["designated"].lower() == "true",
            row["name"],
        )
        for row in dataset.read_csv(data_dir / dataset.MERCHANTS)
    }
    catalog = {
        row["item_code"]: CatalogItem(
            row["item_code"],
            row["name"],
            ItemCategory(row["category"]),
            row["eligible"].lower() == "true",
        )
        for row in dataset.read_csv(data_dir / dataset.ITEMS)
    }
    return merchants, catalog


async def serve(arguments: argparse.Namespace, index: int) -> None:
    from grpc_health.v1 import health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    engine = engine_for(arguments.database_url, arguments.schema, arguments.application_name)
    merchants, catalog = reference_data(arguments.data_dir)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(
        # only Authorize and Capture: the other methods answer UNIMPLEMENTED
        Baseline(  # type: ignore[abstract]
            engine, Authenticator.from_file(arguments.tokens), merchants, catalog
        ),
        GenericOnly(server),  # type: ignore[arg-type]  # as the service adds them
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), GenericOnly(server))
    server.add_insecure_port(f"127.0.0.1:{arguments.port}")
    async with engine.connect() as connection:  # fail early if the database is not there
        await connection.execute(text("SELECT count(*) FROM quotas"))
    await server.start()
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(
        f"baseline worker {index} serving on port {arguments.port} (event loop: {loop_name})",
        flush=True,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1)
    await engine.dispose()


def worker(arguments: argparse.Namespace, index: int) -> None:
    event_loop.run(serve(arguments, index), arguments.event_loop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--application-name", default="mw-baseline")
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    # The service's event loop (MEDWALLET_EVENT_LOOP); the benchmark passes the same to all.
    parser.add_argument("--event-loop", choices=event_loop.CHOICES, default="auto")
    arguments = parser.parse_args(argv)
    arguments.event_loop = event_loop.resolve(arguments.event_loop)
    if arguments.workers == 1:
        worker(arguments, 0)
        return 0
    return run_workers(worker, [(arguments, index) for index in range(arguments.workers)])


if __name__ == "__main__":
    sys.exit(main())
