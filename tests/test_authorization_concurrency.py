"""Concurrency over real gRPC: many tills at once on the same quotas.

Each test fires hundreds of calls at the running server from one asyncio loop (grpc.aio), then
checks that the quota figures equal exactly what the answers imply, that
allocated = available + held + spent for every quota, and that the SQL ledger (CAPTURE minus
REFUND_* rows per relationship) equals spent_fen.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from authz_server.domain.types import LedgerKind
from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
)
from authz_server.storage.sql.tables import LedgerEntryRow
from tests import engine_factories as ef
from tests import factories
from tests.factories import error_info
from tests.harness import Harness, new_id

T = TypeVar("T")
CALLS = 500
FITS = 100
AMOUNT = 1_000
APPROVED = authorization_pb2.DECISION_APPROVED
PARTIAL = authorization_pb2.DECISION_PARTIALLY_APPROVED
DECLINED = authorization_pb2.DECISION_DECLINED
INSUFFICIENT = authorization_pb2.DECLINE_REASON_INSUFFICIENT_QUOTA
CAPTURED = authorization_pb2.AUTHORIZATION_STATUS_CAPTURED
PENDING = authorization_pb2.AUTHORIZATION_STATUS_PENDING
VOIDED = authorization_pb2.AUTHORIZATION_STATUS_VOIDED
FAILED = grpc.StatusCode.FAILED_PRECONDITION


class Retrying:
    """The stub as a till uses it: UNAVAILABLE (the service's bounded Redis timeout, which a
    loaded test machine can hit) is retried with the same request and idempotency key, which
    must answer as the first attempt did or would have."""

    ATTEMPTS = 20

    def __init__(self, stub: authorization_pb2_grpc.AuthorizationServiceStub) -> None:
        self.stub = stub

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.stub, name)

        async def call(request: Any, metadata: Any) -> Any:
            for attempt in range(self.ATTEMPTS):
                try:
                    return await method(request, metadata=metadata)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    if attempt == self.ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
            raise AssertionError("unreachable")

        return call


def run_calls(harness: Harness, body: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Runs body(stub) on a fresh event loop with its own grpc.aio channel to the server."""

    async def main() -> T:
        async with grpc.aio.insecure_channel(harness.address) as channel:
            return await body(Retrying(authorization_pb2_grpc.AuthorizationServiceStub(channel)))

    return asyncio.run(main())


def ledger_spent(harness: Harness, relationship_ids: list[str]) -> dict[str, int]:
    """CAPTURE minus REFUND_TO_QUOTA and REFUND_TO_ACCOUNT rows, per relationship, in SQL."""
    sign = case(
        (LedgerEntryRow.kind == LedgerKind.CAPTURE.value, LedgerEntryRow.amount_fen),
        else_=-LedgerEntryRow.amount_fen,
    )
    kinds = [
        LedgerKind.CAPTURE.value,
        LedgerKind.REFUND_TO_QUOTA.value,
        LedgerKind.REFUND_TO_ACCOUNT.value,
    ]

    def read(session: Session) -> dict[str, int]:
        rows = session.execute(
            select(LedgerEntryRow.relationship_id, func.sum(sign))
            .where(
                LedgerEntryRow.relationship_id.in_(relationship_ids),
                LedgerEntryRow.kind.in_(kinds),
            )
            .group_by(LedgerEntryRow.relationship_id)
        )
        found = {str(rid): int(total) for rid, total in rows}
        return {rid: found.get(rid, 0) for rid in relationship_ids}

    return harness.run(harness.app.database.run(read))


def check_quota(
    relationships: Any,
    harness: Harness,
    relationship_id: str,
    available: int,
    held: int,
    spent: int,
) -> None:
    shown = factories.relationship(relationships, relationship_id)
    assert (shown.available_fen, shown.held_fen, shown.spent_fen) == (available, held, spent)
    assert shown.allocated_fen == shown.available_fen + shown.held_fen + shown.spent_fen
    assert ledger_spent(harness, [relationship_id]) == {relationship_id: spent}


def one_quota(registry: Any, relationships: Any, quota_fen: int) -> tuple[str, str, str]:
    ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    holder = factories.employee(registry, balance_fen=quota_fen + 12_345)
    beneficiary = factories.resident(registry)
    relationship_id = factories.active_relationship(relationships, holder, beneficiary, quota_fen)
    return holder, beneficiary, relationship_id


async def gather_all(calls: list[Awaitable[T]]) -> list[T]:
    return list(await asyncio.gather(*calls))


# --- 500 authorizations on a quota that fits 100 ------------------------------------------------


def test_500_authorizations_on_a_quota_for_100(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    _, beneficiary, relationship_id = one_quota(registry, relationships, FITS * AMOUNT)

    async def body(stub: Any) -> list[authorization_pb2.AuthorizeResponse]:
        return await gather_all(
            [
                stub.Authorize(ef.medical(beneficiary, AMOUNT), metadata=ef.HOSPITAL_TOKEN)
                for _ in range(CALLS)
            ]
        )

    answers = run_calls(harness, body)
    approved = [a for a in answers if a.decision == APPROVED]
    declined = [a for a in answers if a.decision == DECLINED]
    assert len(approved) == FITS
    assert len(declined) == CALLS - FITS
    assert {a.decline_reason for a in declined} == {INSUFFICIENT}
    assert len({a.authorization_id for a in answers}) == CALLS
    for answer in approved:
        assert answer.approved_amount_fen == AMOUNT
        assert [(f.relationship_id, f.amount_fen) for f in answer.funding] == [
            (relationship_id, AMOUNT)
        ]
        assert answer.status == PENDING
    for answer in declined:
        assert answer.approved_amount_fen == 0 and not answer.funding
        assert answer.remaining_quota_fen == 0
    # Every approval saw what the ones before it left: the remaining figures are a permutation.
    assert sorted(a.remaining_quota_fen for a in approved) == [AMOUNT * n for n in range(FITS)]
    check_quota(relationships, harness, relationship_id, 0, FITS * AMOUNT, 0)


# --- captures, voids and refunds racing ----------------------------------------------------------


@dataclass
class Tally:
    """What the answers say happened to each authorization."""

    approved: dict[str, int] = field(default_factory=dict)
    captured: dict[str, int] = field(default_factory=dict)
    refunded: dict[str, int] = field(default_factory=dict)
    voided: set[str] = field(default_factory=set)
    refusals: list[str] = field(default_factory=list)

    def add_refund(self, authorization_id: str, amount: int) -> None:
        self.refunded[authorization_id] = self.refunded.get(authorization_id, 0) + amount


def reason_of(error: grpc.aio.AioRpcError) -> str:
    assert error.code() == FAILED, (error.code(), error.details())
    return str(error_info(error).reason)


async def settle(
    stub: Any, answer: authorization_pb2.AuthorizeResponse, index: int, tally: Tally
) -> None:
    """A follow-up chosen by index, racing everything else in flight."""
    aid = answer.authorization_id
    tally.approved[aid] = answer.approved_amount_fen
    amount = answer.approved_amount_fen
    token = ef.HOSPITAL_TOKEN

    async def capture(fen: int, key: str) -> bool:
        try:
            reply = await stub.Capture(
                authorization_pb2.CaptureRequest(
                    authorization_id=aid, amount_fen=fen, idempotency_key=key
                ),
                metadata=token,
            )
        except grpc.aio.AioRpcError as error:
            tally.refusals.append(reason_of(error))
            return False
        assert reply.authorization.status == CAPTURED
        assert reply.authorization.captured_amount_fen == (fen or amount)
        tally.captured[aid] = reply.authorization.captured_amount_fen
        return True

    async def void() -> bool:
        try:
            reply = await stub.Void(
                authorization_pb2.VoidRequest(authorization_id=aid), metadata=token
            )
        except grpc.aio.AioRpcError as error:
            tally.refusals.append(reason_of(error))
            return False
        assert reply.authorization.status == VOIDED
        tally.voided.add(aid)
        return True

    async def refund(fen: int) -> bool:
        try:
            reply = await stub.Refund(
                authorization_pb2.RefundRequest(
                    authorization_id=aid, amount_fen=fen, idempotency_key=new_id("refund")
                ),
                metadata=token,
            )
        except grpc.aio.AioRpcError as error:
            tally.refusals.append(reason_of(error))
            return False
        assert [(p.amount_fen, p.to_personal_account) for p in reply.parts] == [(fen, False)]
        tally.add_refund(aid, fen)
        return True

    choice = index % 7
    if choice == 0:  # capture all
        await capture(0, new_id("cap"))
    elif choice == 1:  # capture part, then two partial refunds racing
        assert await capture(amount // 2, new_id("cap"))
        assert all(await asyncio.gather(refund(100), refund(amount // 2 - 100)))
    elif choice == 2:  # void
        assert await void()
    elif choice == 3:  # capture and void race: exactly one of them wins
        won = await asyncio.gather(capture(0, new_id("cap")), void())
        assert sorted(won) == [False, True]
    elif choice == 4:  # two captures under different keys race: exactly one wins
        won = await asyncio.gather(capture(0, new_id("cap")), capture(300, new_id("cap")))
        assert sorted(won) == [False, True]
    elif choice == 5:  # capture all, then two refunds that together exceed it: one is refused
        assert await capture(0, new_id("cap"))
        won = await asyncio.gather(refund(amount - 200), refund(400))
        assert sorted(won) == [False, True]
    # choice 6: left pending


def test_captures_voids_and_refunds_racing(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    _, beneficiary, relationship_id = one_quota(registry, relationships, FITS * AMOUNT)
    tally = Tally()

    async def body(stub: Any) -> list[authorization_pb2.AuthorizeResponse]:
        async def one(index: int) -> authorization_pb2.AuthorizeResponse:
            answer = await stub.Authorize(
                ef.medical(beneficiary, AMOUNT), metadata=ef.HOSPITAL_TOKEN
            )
            if answer.decision == APPROVED:
                await settle(stub, answer, index, tally)
            return answer

        return await gather_all([one(index) for index in range(CALLS)])

    answers = run_calls(harness, body)
    approved = [a for a in answers if a.decision == APPROVED]
    # Voids and partial captures give money back while others still ask: more than FITS may
    # pass, but never more than the quota held at each moment (checked by the figures below).
    assert len(approved) >= FITS
    assert {a.decline_reason for a in answers if a.decision != APPROVED} <= {INSUFFICIENT}
    assert set(tally.refusals) <= {
        "ALREADY_CAPTURED",
        "ALREADY_VOIDED",
        "REFUND_EXCEEDS_CAPTURED",
    }
    assert tally.voided.isdisjoint(tally.captured)
    pending = set(tally.approved) - tally.voided - set(tally.captured)
    held = sum(tally.approved[aid] for aid in pending)
    spent = sum(tally.captured.values()) - sum(tally.refunded.values())
    available = FITS * AMOUNT - held - spent
    assert available >= 0
    check_quota(relationships, harness, relationship_id, available, held, spent)

    async def statuses(stub: Any) -> list[authorization_pb2.Authorization]:
        replies = await gather_all(
            [
                stub.GetAuthorization(
                    authorization_pb2.GetAuthorizationRequest(authorization_id=aid),
                    metadata=ef.HOSPITAL_TOKEN,
                )
                for aid in tally.approved
            ]
        )
        return [reply.authorization for reply in replies]

    for shown in run_calls(harness, statuses):
        aid = shown.authorization_id
        expected_status = (
            VOIDED if aid in tally.voided else CAPTURED if aid in tally.captured else PENDING
        )
        assert shown.status == expected_status
        assert shown.captured_amount_fen == tally.captured.get(aid, 0)
        assert shown.refunded_amount_fen == tally.refunded.get(aid, 0)


# --- split funding across three quotas -----------------------------------------------------------


def three_quotas(registry: Any, relationships: Any, quotas: list[int]) -> tuple[str, list[str]]:
    ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
    beneficiary = factories.resident(registry)
    relationship_ids = []
    for quota in quotas:
        holder = factories.employee(registry, balance_fen=quota)
        relationship_ids.append(
            factories.active_relationship(relationships, holder, beneficiary, quota)
        )
    return beneficiary, relationship_ids


def funding_of(answer: authorization_pb2.AuthorizeResponse) -> list[tuple[str, int]]:
    return [(f.relationship_id, f.amount_fen) for f in answer.funding]


def test_split_funding_across_three_quotas(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    # 33 authorizations fit the first, 33 the second, 33 the third; the 100th is split across
    # all three (500 + 250 + 250), and nothing is left for the other 400.
    quotas = [33_500, 33_250, 33_250]
    beneficiary, relationship_ids = three_quotas(registry, relationships, quotas)

    async def body(stub: Any) -> list[authorization_pb2.AuthorizeResponse]:
        return await gather_all(
            [
                stub.Authorize(ef.medical(beneficiary, AMOUNT), metadata=ef.HOSPITAL_TOKEN)
                for _ in range(CALLS)
            ]
        )

    answers = run_calls(harness, body)
    approved = [a for a in answers if a.decision == APPROVED]
    assert len(approved) == FITS
    assert {a.decline_reason for a in answers if a.decision != APPROVED} == {INSUFFICIENT}
    held: dict[str, int] = dict.fromkeys(relationship_ids, 0)
    splits = []
    for answer in approved:
        parts = funding_of(answer)
        assert sum(fen for _, fen in parts) == answer.approved_amount_fen == AMOUNT
        assert len({rid for rid, _ in parts}) == len(parts)
        for rid, fen in parts:
            held[rid] += fen
        if len(parts) > 1:
            splits.append(parts)
    assert splits == [list(zip(relationship_ids, [500, 250, 250], strict=True))]
    assert held == dict(zip(relationship_ids, quotas, strict=True))
    for rid in relationship_ids:
        check_quota(relationships, harness, rid, 0, held[rid], 0)


def test_split_funding_with_partial_approvals_and_captures(
    harness: Harness, registry: Any, relationships: Any
) -> None:
    """Mixed amounts, some allow_partial, each approval captured in part or in full, voided or
    left pending while the others still ask: no quota goes below zero, every approval is funded
    exactly, and each quota's figures equal the sum of what the answers drew from it."""
    quotas = [20_011, 30_013, 50_021]
    beneficiary, relationship_ids = three_quotas(registry, relationships, quotas)
    rng = random.Random(20240607)
    plan = [(rng.randrange(500, 4_000), rng.random() < 0.3, rng.randrange(4)) for _ in range(CALLS)]
    # per relationship: (held, captured) as the answers say
    held: dict[str, int] = dict.fromkeys(relationship_ids, 0)
    spent: dict[str, int] = dict.fromkeys(relationship_ids, 0)

    async def body(stub: Any) -> list[tuple[int, bool, authorization_pb2.AuthorizeResponse]]:
        async def one(amount: int, partial: bool, then: int) -> tuple[int, bool, Any]:
            answer = await stub.Authorize(
                ef.medical(beneficiary, amount, allow_partial=partial), metadata=ef.HOSPITAL_TOKEN
            )
            parts = funding_of(answer)
            if answer.decision == DECLINED:
                return amount, partial, answer
            aid = answer.authorization_id
            if then == 0:  # capture a part: drawn from the funding parts in order
                fen = max(1, answer.approved_amount_fen // 3)
                reply = await stub.Capture(
                    authorization_pb2.CaptureRequest(
                        authorization_id=aid, amount_fen=fen, idempotency_key=new_id("cap")
                    ),
                    metadata=ef.HOSPITAL_TOKEN,
                )
                assert reply.authorization.captured_amount_fen == fen
                left = fen
                for rid, part in parts:
                    take = min(left, part)
                    spent[rid] += take
                    left -= take
            elif then == 1:  # capture all
                await stub.Capture(
                    authorization_pb2.CaptureRequest(
                        authorization_id=aid, idempotency_key=new_id("cap")
                    ),
                    metadata=ef.HOSPITAL_TOKEN,
                )
                for rid, part in parts:
                    spent[rid] += part
            elif then == 2:
                await stub.Void(
                    authorization_pb2.VoidRequest(authorization_id=aid), metadata=ef.HOSPITAL_TOKEN
                )
            else:
                for rid, part in parts:
                    held[rid] += part
            return amount, partial, answer

        return await gather_all([one(*step) for step in plan])

    results = run_calls(harness, body)
    splits = 0
    for amount, partial, answer in results:
        parts = funding_of(answer)
        assert sum(fen for _, fen in parts) == answer.approved_amount_fen
        assert all(fen > 0 for _, fen in parts)
        assert {rid for rid, _ in parts} <= set(relationship_ids)
        if answer.decision == APPROVED:
            assert answer.approved_amount_fen == amount
        elif answer.decision == PARTIAL:
            assert partial and 0 < answer.approved_amount_fen < amount
            assert answer.remaining_quota_fen == 0
        else:
            assert answer.decline_reason == INSUFFICIENT and not parts
            assert answer.remaining_quota_fen < amount
        if len(parts) > 1:
            splits += 1
    assert splits > 0
    for rid, quota in zip(relationship_ids, quotas, strict=True):
        assert spent[rid] + held[rid] <= quota
        check_quota(
            relationships, harness, rid, quota - held[rid] - spent[rid], held[rid], spent[rid]
        )
