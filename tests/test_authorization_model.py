"""Property: the authorization engine behaves like a plain-Python model of quotas and holds.

A Hypothesis state machine drives random sequences through the real gRPC stubs: allocations and
releases, authorizations (medical and pharmacy, at the wrong kind of merchant, with and without
allow_partial, a named relationship or the service's choice, captured at once or not), captures
(full, partial, over the approved amount, by another merchant, retried), voids, refunds, the
clock moving past the 15-minute pharmacy and 24-hour medical holds, dissolutions, insurance
events (TERMINATED, TRANSFERRED, REINSTATED) and new relationships. The model predicts every
answer (decision, decline reason, approved amount, funding, line results, remaining quota,
status, expiry; error codes and reasons); after every step the service must agree with it on
every quota, holder balance and authorization, and

    allocated = available + held + captured - refunded + released   (per relationship; in API
                terms allocated_fen == available_fen + held_fen + spent_fen)
    holder balance + sum of the holder's quotas' allocated_fen == everything credited
    SQL ledger: CAPTURE - REFUND_* rows per relationship == spent_fen

The server clock only moves forward and is shared by the session, so expiry is decided relative
to each hold's own expires_at, and the clock moves in steps of whole 10 minutes so that no hold
is ever within seconds of its expiry when the service looks at it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, settings
from hypothesis import event as observe
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    common_pb2,
    registry_pb2,
    relationship_pb2,
)
from authz_server.storage.redis.sweep_store import SweepStore
from tests import engine_factories as ef
from tests import factories
from tests.harness import ADMIN, APP, Harness, new_id
from tests.test_authorization_concurrency import ledger_spent

A = authorization_pb2
PENDING = A.AUTHORIZATION_STATUS_PENDING
CAPTURED = A.AUTHORIZATION_STATUS_CAPTURED
VOIDED = A.AUTHORIZATION_STATUS_VOIDED
EXPIRED = A.AUTHORIZATION_STATUS_EXPIRED
DECLINED_STATUS = A.AUTHORIZATION_STATUS_DECLINED
APPROVED = A.DECISION_APPROVED
PARTIAL = A.DECISION_PARTIALLY_APPROVED
DECLINED = A.DECISION_DECLINED
R = A.DeclineReason
NOT_FOUND_R = R.Value("DECLINE_REASON_RELATIONSHIP_NOT_FOUND")
NOT_ACTIVE_R = R.Value("DECLINE_REASON_RELATIONSHIP_NOT_ACTIVE")
INSUFFICIENT_R = R.Value("DECLINE_REASON_INSUFFICIENT_QUOTA")
INELIGIBLE_R = R.Value("DECLINE_REASON_ITEM_NOT_ELIGIBLE")
PURPOSE_R = R.Value("DECLINE_REASON_PURPOSE_NOT_ALLOWED")
MEDICAL = common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET
PHARMACY = common_pb2.PURPOSE_PHARMACY
FAILED = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TERMINATED = registry_pb2.INSURANCE_EVENT_TYPE_TERMINATED
TRANSFERRED = registry_pb2.INSURANCE_EVENT_TYPE_TRANSFERRED
REINSTATED = registry_pb2.INSURANCE_EVENT_TYPE_REINSTATED
TERMINATION_REASONS = [
    registry_pb2.TERMINATION_REASON_RETIREMENT,
    registry_pb2.TERMINATION_REASON_DEATH,
    registry_pb2.TERMINATION_REASON_WITHDRAWAL,
]
REGIONS = ["110100", "310100", "440300"]
ELIGIBLE_KINDS = ("drug", "device", "consumable")
ITEM_KINDS = (*ELIGIBLE_KINDS, "cosmetic", "service")
TOKENS = {ef.HOSPITAL: ef.HOSPITAL_TOKEN, ef.PHARMACY: ef.PHARMACY_TOKEN}
OTHER = {ef.HOSPITAL: ef.PHARMACY, ef.PHARMACY: ef.HOSPITAL}
# Clock steps: whole 10 minutes (see the module docstring). 20 minutes ends any pharmacy hold
# that is at least that old; 25 hours ends every hold.
ADVANCE_SECONDS = [600, 1200, 90_000]
# No open hold may be closer than this to its expiry when the clock stops: the service looks at
# it (lazily, or in its sweeper) a little later than the model does.
EXPIRY_MARGIN_MS = 60_000

PICK = st.integers(min_value=0, max_value=1_000_000)
# Where the money comes from: the service's choice (most often), a quota of the beneficiary's
# own (perhaps dissolved), or another beneficiary's quota.
FUNDING_FROM = st.sampled_from(["choose", "choose", "choose", "own", "foreign"])
CAPTURE_AT_ONCE = st.sampled_from([False, False, False, True])
# Which authorization a capture, void or refund acts on: most often one it can act on.
PREFER = st.sampled_from(["open", "open", "closed", "any"])
Line = tuple[str, int, int]  # (item kind, amount fen, quantity)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def ts_ms(stamp: Timestamp) -> int:
    return stamp.seconds * 1000 + stamp.nanos // 1_000_000


def failure(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str, str]:
    """Runs a call that must fail: (code, ErrorInfo reason, field)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    info = factories.error_info(error)
    return error.code(), info.reason, info.metadata.get("field", "")  # type: ignore[attr-defined]


@dataclass
class Person:
    participant_id: str
    scheme: int
    region: str
    active: bool = True
    balance: int = 0
    credited: int = 0


@dataclass
class Quota:
    relationship_id: str
    holder: str
    beneficiary: str
    order: tuple[int, int]  # activated_at (seconds, nanos): the funding order
    active: bool = True
    allocated: int = 0
    released: int = 0
    captured: int = 0
    refunded: int = 0
    available: int = 0


@dataclass
class Auth:
    authorization_id: str
    merchant: str
    beneficiary: str
    purpose: int
    status: int
    approved: int
    funding: list[tuple[str, int]]
    expires_ms: int
    # What a capture of a voided hold is told.
    void_reason: str = "ALREADY_VOIDED"
    captured: int = 0
    refunded: int = 0
    # Captured parts: [relationship id, captured, refunded] in funding order, zero parts left out.
    parts: list[list[Any]] = field(default_factory=list)
    capture_request: A.CaptureRequest | None = None
    capture_reply: A.CaptureResponse | None = None


def machine(harness: Harness, registry: Any, relationships: Any, authorizations: Any) -> type:
    pharmacy_ms = harness.settings.pharmacy_hold_seconds * 1000
    medical_ms = harness.settings.medical_hold_seconds * 1000

    def now_ms() -> int:
        return ms(harness.clock())

    class Engine(RuleBasedStateMachine):
        holders: list[Person]
        beneficiaries: list[Person]
        quotas: dict[str, Quota]
        auths: list[Auth]
        codes: dict[str, str]
        # Authorizations the next check looks at in the service (see service_agrees).
        watch: set[str]

        # ------------------------------------------------------------ model helpers

        def person(self, participant_id: str) -> Person:
            return next(
                p for p in self.holders + self.beneficiaries if p.participant_id == participant_id
            )

        def held(self, quota: Quota) -> int:
            if not quota.active:
                return 0
            return sum(
                fen
                for auth in self.auths
                if auth.status == PENDING
                for rid, fen in auth.funding
                if rid == quota.relationship_id
            )

        def release_hold(self, auth: Auth, status: int) -> None:
            """A pending hold ends without capture: its parts go back to active quotas."""
            auth.status = status
            for rid, fen in auth.funding:
                if self.quotas[rid].active:
                    self.quotas[rid].available += fen

        def dissolve_in_model(self, quota: Quota) -> int:
            returned = quota.available + self.held(quota)
            for auth in self.auths:
                if auth.status == PENDING and any(
                    rid == quota.relationship_id for rid, _ in auth.funding
                ):
                    auth.void_reason = "RELATIONSHIP_NOT_ACTIVE"
                    auth.status = VOIDED
                    for rid, fen in auth.funding:
                        if rid != quota.relationship_id and self.quotas[rid].active:
                            self.quotas[rid].available += fen
            quota.active = False
            quota.available = 0
            quota.released += returned
            self.person(quota.holder).balance += returned
            return returned

        def active_quotas(self, beneficiary_id: str) -> list[Quota]:
            return sorted(
                (q for q in self.quotas.values() if q.active and q.beneficiary == beneficiary_id),
                key=lambda q: (q.order, q.relationship_id),
            )

        def establish_quota(self, holder: Person, beneficiary: Person) -> Quota:
            time.sleep(0.005)  # distinct activation instants: an unambiguous funding order
            rid = factories.active_relationship(
                relationships, holder.participant_id, beneficiary.participant_id
            )
            shown = factories.relationship(relationships, rid)
            quota = Quota(
                rid,
                holder.participant_id,
                beneficiary.participant_id,
                (shown.activated_at.seconds, shown.activated_at.nanos),
            )
            self.quotas[rid] = quota
            return quota

        def pick_auth(self, pick: int, prefer: str, status: int) -> Auth:
            chosen = {
                "open": [a for a in self.auths if a.status == status],
                "closed": [a for a in self.auths if a.status not in (status, DECLINED_STATUS)],
            }.get(prefer, [])
            chosen = chosen or self.auths
            auth = chosen[pick % len(chosen)]
            self.watch.add(auth.authorization_id)
            return auth

        def expect_failure(
            self, call: Callable[[], Any], code: grpc.StatusCode, reason: str, field: str = ""
        ) -> None:
            got = failure(call)
            assert got[0] == code, got
            assert got[1] == reason, got
            if field:
                assert got[2] == field, got

        # ------------------------------------------------------------ setup

        @initialize(
            balances=st.lists(st.integers(0, 150_000), min_size=3, max_size=3),
            quotas=st.lists(st.integers(8_000, 50_000), min_size=4, max_size=4),
        )
        def setup(self, balances: list[int], quotas: list[int]) -> None:
            ef.merchant(registry, ef.HOSPITAL, common_pb2.MERCHANT_KIND_MEDICAL_INSTITUTION)
            ef.merchant(registry, ef.PHARMACY, common_pb2.MERCHANT_KIND_RETAIL_PHARMACY)
            self.codes = ef.items(registry)
            self.holders = []
            for index, opening in enumerate(balances):
                region = REGIONS[index]
                holder = Person(
                    factories.employee(registry, opening + 100_000, region),
                    common_pb2.SCHEME_EMPLOYEE,
                    region,
                )
                holder.balance = holder.credited = opening + 100_000
                self.holders.append(holder)
            resident = factories.resident(registry, "440300")
            employee = factories.employee(registry, 0, "110100")
            self.beneficiaries = [
                Person(resident, common_pb2.SCHEME_RESIDENT, "440300"),
                Person(employee, common_pb2.SCHEME_EMPLOYEE, "110100"),
            ]
            self.quotas = {}
            self.auths = []
            self.watch = set()
            pairs = [(0, 0), (1, 0), (2, 0), (0, 1)]
            for (h, b), amount in zip(pairs, quotas, strict=True):
                quota = self.establish_quota(self.holders[h], self.beneficiaries[b])
                self.allocate_to(quota, amount)

        # ------------------------------------------------------------ quota moves

        def allocate_to(self, quota: Quota, amount: int) -> None:
            holder = self.person(quota.holder)
            request = relationship_pb2.AllocateQuotaRequest(
                relationship_id=quota.relationship_id,
                amount_fen=amount,
                idempotency_key=new_id("alloc"),
            )
            call = lambda: relationships.AllocateQuota(request, metadata=APP)  # noqa: E731
            if not quota.active:
                self.expect_failure(call, FAILED, "RELATIONSHIP_NOT_ACTIVE")
                return
            if amount > holder.balance:
                self.expect_failure(call, FAILED, "INSUFFICIENT_BALANCE")
                return
            answer = call()
            holder.balance -= amount
            quota.allocated += amount
            quota.available += amount
            assert answer.holder_balance_fen == holder.balance
            self.check_relationship(answer.relationship, quota)

        @rule(pick=PICK, amount=st.integers(1, 80_000))
        def allocate(self, pick: int, amount: int) -> None:
            quotas = list(self.quotas.values())
            self.allocate_to(quotas[pick % len(quotas)], amount)

        @rule(pick=PICK, amount=st.integers(1, 30_000))
        def release(self, pick: int, amount: int) -> None:
            quotas = list(self.quotas.values())
            quota = quotas[pick % len(quotas)]
            holder = self.person(quota.holder)
            request = relationship_pb2.ReleaseQuotaRequest(
                relationship_id=quota.relationship_id,
                amount_fen=amount,
                idempotency_key=new_id("release"),
            )
            call = lambda: relationships.ReleaseQuota(request, metadata=APP)  # noqa: E731
            if not quota.active:
                self.expect_failure(call, FAILED, "RELATIONSHIP_NOT_ACTIVE")
                return
            if amount > quota.available:
                self.expect_failure(call, FAILED, "INSUFFICIENT_QUOTA")
                return
            answer = call()
            holder.balance += amount
            quota.released += amount
            quota.available -= amount
            assert answer.holder_balance_fen == holder.balance
            self.check_relationship(answer.relationship, quota)

        # ------------------------------------------------------------ authorize

        @rule(
            who=PICK,
            amount=st.integers(1, 15_000),
            allow_partial=st.booleans(),
            funding_from=FUNDING_FROM,
            rid_pick=PICK,
            capture=CAPTURE_AT_ONCE,
            wrong_merchant=st.sampled_from([False] * 5 + [True]),
        )
        def authorize_medical(
            self,
            who: int,
            amount: int,
            allow_partial: bool,
            funding_from: str,
            rid_pick: int,
            capture: bool,
            wrong_merchant: bool,
        ) -> None:
            kind = "wrong merchant" if wrong_merchant else "medical"
            self.authorize(who, kind, amount, [], allow_partial, funding_from, rid_pick, capture)

        @rule(
            who=PICK,
            amount=st.integers(30_000, 120_000),
            allow_partial=st.booleans(),
            funding_from=FUNDING_FROM,
            rid_pick=PICK,
        )
        def authorize_large(
            self, who: int, amount: int, allow_partial: bool, funding_from: str, rid_pick: int
        ) -> None:
            """Large bills: splits across quotas, partial approvals, declines for want of quota."""
            self.authorize(who, "medical", amount, [], allow_partial, funding_from, rid_pick, False)

        @rule(
            who=PICK,
            lines=st.lists(
                st.tuples(st.sampled_from(ITEM_KINDS), st.integers(1, 8_000), st.integers(1, 3)),
                min_size=1,
                max_size=4,
            ),
            allow_partial=st.booleans(),
            funding_from=FUNDING_FROM,
            rid_pick=PICK,
            capture=CAPTURE_AT_ONCE,
        )
        def authorize_pharmacy(
            self,
            who: int,
            lines: list[Line],
            allow_partial: bool,
            funding_from: str,
            rid_pick: int,
            capture: bool,
        ) -> None:
            amount = sum(fen for _, fen, _ in lines)
            self.authorize(
                who, "pharmacy", amount, lines, allow_partial, funding_from, rid_pick, capture
            )

        def authorize(
            self,
            who: int,
            kind: str,
            amount: int,
            lines: list[Line],
            allow_partial: bool,
            funding_from: str,
            rid_pick: int,
            capture: bool,
        ) -> None:
            beneficiary = self.beneficiaries[who % len(self.beneficiaries)].participant_id
            pharmacy = kind == "pharmacy"
            merchant = ef.PHARMACY if kind != "medical" else ef.HOSPITAL
            purpose = PHARMACY if pharmacy else MEDICAL
            relationship_id = ""
            if funding_from != "choose":
                mine = funding_from == "own"
                pool = [q for q in self.quotas.values() if (q.beneficiary == beneficiary) == mine]
                if pool:
                    relationship_id = pool[rid_pick % len(pool)].relationship_id
            request = A.AuthorizeRequest(
                idempotency_key=new_id("auth"),
                beneficiary_id=beneficiary,
                relationship_id=relationship_id,
                purpose=purpose,
                lines=[
                    A.AuthorizationLine(item_code=self.codes[k], quantity=q, amount_fen=fen)
                    for k, fen, q in lines
                ],
                amount_fen=amount,
                allow_partial=allow_partial,
                capture=capture,
            )
            before = now_ms()
            answer = authorizations.Authorize(request, metadata=TOKENS[merchant])
            after = now_ms()

            # --- the model's answer
            template = [
                (self.codes[k], k in ELIGIBLE_KINDS, fen) if pharmacy else ("", True, fen)
                for k, fen, _ in lines
            ]
            reason = 0
            if kind == "wrong merchant":
                reason = PURPOSE_R
                template = [(code, False, 0) for code, _, _ in template]
            eligible = sum(fen for _, ok, fen in template if ok) if template else amount
            if not reason and (eligible == 0 or (eligible < amount and not allow_partial)):
                reason = INELIGIBLE_R
            candidates: list[Quota] = []
            missing = 0
            if reason in (0, INELIGIBLE_R):
                if relationship_id:
                    quota = self.quotas[relationship_id]
                    if quota.beneficiary != beneficiary:
                        missing = NOT_FOUND_R
                    elif not quota.active:
                        missing = NOT_ACTIVE_R
                    else:
                        candidates = [quota]
                else:
                    candidates = self.active_quotas(beneficiary)
                    if not candidates:
                        missing = NOT_FOUND_R
                reason = reason or missing
            funding: list[tuple[str, int]] = []
            if not reason:
                need = eligible
                single = next((q for q in candidates if q.available >= need), None)
                if single is not None:
                    funding = [(single.relationship_id, need)]
                else:
                    total = sum(q.available for q in candidates)
                    approve = need if total >= need else (total if allow_partial else 0)
                    for quota in candidates:
                        take = min(approve, quota.available)
                        if take:
                            funding.append((quota.relationship_id, take))
                            approve -= take
                if not funding:
                    reason = INSUFFICIENT_R
            approved = sum(fen for _, fen in funding)
            for rid, fen in funding:
                self.quotas[rid].available -= fen
            remaining = sum(q.available for q in candidates)
            if reason:
                decision, status = DECLINED, DECLINED_STATUS
                expected_lines = [
                    (code, False, reason if ok else INELIGIBLE_R, 0) for code, ok, _ in template
                ]
            else:
                decision = PARTIAL if approved < amount else APPROVED
                status = CAPTURED if capture else PENDING
                left = approved
                expected_lines = []
                for code, ok, fen in template:
                    paid = min(left, fen) if ok else 0
                    left -= paid
                    why = 0 if paid else (INSUFFICIENT_R if ok else INELIGIBLE_R)
                    expected_lines.append((code, bool(paid), why, paid))

            observe(
                f"authorize {kind}: {A.Decision.Name(decision)} {R.Name(reason)}"
                f"{' split' if len(funding) > 1 else ''}{' captured' if capture else ''}"
            )
            # --- the service's answer
            assert answer.decision == decision, (answer, decision, reason)
            assert answer.decline_reason == reason
            assert answer.approved_amount_fen == approved
            assert [(f.relationship_id, f.amount_fen) for f in answer.funding] == funding
            assert answer.remaining_quota_fen == remaining
            assert answer.status == status
            if pharmacy:
                got_lines = [
                    (x.item_code, x.approved, x.decline_reason, x.approved_amount_fen)
                    for x in answer.line_results
                ]
                assert got_lines == expected_lines
            else:
                assert not answer.line_results
            hold_ms = pharmacy_ms if pharmacy else medical_ms
            if reason:
                assert not answer.HasField("expires_at")
                expires = 0
            else:
                expires = ts_ms(answer.expires_at)
                assert before + hold_ms - 1 <= expires <= after + hold_ms + 1
            auth = Auth(
                answer.authorization_id,
                merchant,
                beneficiary,
                purpose,
                status,
                approved,
                funding,
                expires,
            )
            if status == CAPTURED:
                auth.captured = approved
                auth.parts = [[rid, fen, 0] for rid, fen in funding]
                for rid, fen in funding:
                    self.quotas[rid].captured += fen
            self.auths.append(auth)
            self.watch.add(auth.authorization_id)

        # ------------------------------------------------------------ capture, void, refund

        @precondition(lambda self: bool(self.auths))
        @rule(
            pick=PICK,
            prefer=PREFER,
            mode=st.sampled_from(["all", "zero", "part", "part", "over", "other merchant"]),
            percent=st.integers(1, 99),
        )
        def capture(self, pick: int, prefer: str, mode: str, percent: int) -> None:
            auth = self.pick_auth(pick, prefer, PENDING)
            amount = {
                "all": auth.approved,
                "zero": 0,
                "part": max(1, auth.approved * percent // 100),
                "over": auth.approved + 1,
                "other merchant": 0,
            }[mode]
            request = A.CaptureRequest(
                authorization_id=auth.authorization_id,
                amount_fen=amount,
                idempotency_key=new_id("cap"),
            )
            merchant = OTHER[auth.merchant] if mode == "other merchant" else auth.merchant
            call = lambda: authorizations.Capture(request, metadata=TOKENS[merchant])  # noqa: E731
            observe(f"capture {mode}: {A.AuthorizationStatus.Name(auth.status)} {auth.void_reason}")
            if mode == "other merchant":
                self.expect_failure(call, NOT_FOUND, "NOT_FOUND")
                return
            refusal = {
                CAPTURED: "ALREADY_CAPTURED",
                VOIDED: auth.void_reason,
                EXPIRED: "AUTHORIZATION_EXPIRED",
                DECLINED_STATUS: "AUTHORIZATION_DECLINED",
            }.get(auth.status)
            if refusal:
                self.expect_failure(call, FAILED, refusal)
                return
            if amount > auth.approved:
                self.expect_failure(call, INVALID, "INVALID_ARGUMENT", "amount_fen")
                return
            assert now_ms() < auth.expires_ms - EXPIRY_MARGIN_MS
            answer = call()
            take = amount or auth.approved
            auth.status = CAPTURED
            auth.captured = take
            left = take
            for rid, fen in auth.funding:
                part = min(left, fen)
                left -= part
                quota = self.quotas[rid]
                quota.captured += part
                quota.available += fen - part
                if part:
                    auth.parts.append([rid, part, 0])
            auth.capture_request, auth.capture_reply = request, answer
            self.check_authorization(answer.authorization, auth, with_times=False)

        @precondition(lambda self: any(a.capture_reply is not None for a in self.auths))
        @rule(pick=PICK)
        def capture_again(self, pick: int) -> None:
            """The same capture retried with its key answers as it did the first time."""
            done = [a for a in self.auths if a.capture_reply is not None]
            auth = done[pick % len(done)]
            again = authorizations.Capture(auth.capture_request, metadata=TOKENS[auth.merchant])
            assert again == auth.capture_reply

        @precondition(lambda self: bool(self.auths))
        @rule(pick=PICK, prefer=PREFER, other_merchant=st.sampled_from([False] * 4 + [True]))
        def void(self, pick: int, prefer: str, other_merchant: bool) -> None:
            auth = self.pick_auth(pick, prefer, PENDING)
            request = A.VoidRequest(authorization_id=auth.authorization_id)
            merchant = OTHER[auth.merchant] if other_merchant else auth.merchant
            call = lambda: authorizations.Void(request, metadata=TOKENS[merchant])  # noqa: E731
            if other_merchant:
                self.expect_failure(call, NOT_FOUND, "NOT_FOUND")
                return
            refusal = {
                CAPTURED: "ALREADY_CAPTURED",
                EXPIRED: "AUTHORIZATION_EXPIRED",
                DECLINED_STATUS: "AUTHORIZATION_DECLINED",
            }.get(auth.status)
            observe(f"void: {A.AuthorizationStatus.Name(auth.status)}")
            if refusal:
                self.expect_failure(call, FAILED, refusal)
                return
            if auth.status == PENDING:  # voiding a voided one is a harmless repeat
                assert now_ms() < auth.expires_ms - EXPIRY_MARGIN_MS
                self.release_hold(auth, VOIDED)
            answer = call()
            self.check_authorization(answer.authorization, auth)

        @precondition(lambda self: bool(self.auths))
        @rule(
            pick=PICK,
            prefer=PREFER,
            mode=st.sampled_from(["part", "part", "rest", "over", "other merchant"]),
            percent=st.integers(1, 99),
        )
        def refund(self, pick: int, prefer: str, mode: str, percent: int) -> None:
            auth = self.pick_auth(pick, prefer, CAPTURED)
            left = auth.captured - auth.refunded
            amount = {
                "part": max(1, left * percent // 100),
                "rest": max(1, left),
                "over": left + 1,
                "other merchant": 1,
            }[mode]
            request = A.RefundRequest(
                authorization_id=auth.authorization_id,
                amount_fen=amount,
                idempotency_key=new_id("refund"),
            )
            merchant = OTHER[auth.merchant] if mode == "other merchant" else auth.merchant
            call = lambda: authorizations.Refund(request, metadata=TOKENS[merchant])  # noqa: E731
            if mode == "other merchant":
                self.expect_failure(call, NOT_FOUND, "NOT_FOUND")
                return
            if auth.status != CAPTURED or amount > left:
                self.expect_failure(call, FAILED, "REFUND_EXCEEDS_CAPTURED")
                return
            answer = call()
            expected_parts = []
            rest = amount
            for part in reversed(auth.parts):  # last-drawn part first
                take = min(rest, part[1] - part[2])
                if take <= 0:
                    continue
                rest -= take
                part[2] += take
                quota = self.quotas[part[0]]
                quota.refunded += take
                if quota.active:
                    quota.available += take
                else:  # through the dissolved quota straight back to the holder's account
                    quota.released += take
                    self.person(quota.holder).balance += take
                expected_parts.append((part[0], take, not quota.active))
            auth.refunded += amount
            got = [(p.relationship_id, p.amount_fen, p.to_personal_account) for p in answer.parts]
            observe(f"refund: {len(got)} parts, to account {any(p[2] for p in got)}")
            assert got == expected_parts
            shown = answer.authorization
            assert (shown.authorization_id, shown.status) == (auth.authorization_id, CAPTURED)
            assert (shown.captured_amount_fen, shown.refunded_amount_fen) == (
                auth.captured,
                auth.refunded,
            )

        @precondition(lambda self: any(a.status == PENDING for a in self.auths))
        @rule(
            pick=PICK,
            action=st.sampled_from(["all", "zero", "part", "part", "void"]),
            percent=st.integers(1, 99),
        )
        def settle(self, pick: int, action: str, percent: int) -> None:
            """An open hold is captured (in full or in part) or voided: the common case."""
            if action == "void":
                self.void(pick, "open", False)
            else:
                self.capture(pick, "open", action, percent)

        @precondition(lambda self: any(a.captured > a.refunded for a in self.auths))
        @rule(pick=PICK, mode=st.sampled_from(["part", "rest"]), percent=st.integers(1, 99))
        def refund_captured(self, pick: int, mode: str, percent: int) -> None:
            self.refund(pick, "open", mode, percent)

        # ------------------------------------------------------------ time

        @rule(seconds=st.sampled_from(ADVANCE_SECONDS))
        def advance(self, seconds: int) -> None:
            """The clock moves on; the sweeper returns every hold whose time has come."""
            harness.clock.advance(seconds)
            moment = now_ms()
            harness.run(SweepStore(harness.app.pipelined_redis).sweep(now_ms()))
            for auth in self.auths:
                if auth.status != PENDING:
                    continue
                if auth.expires_ms <= moment:
                    observe(f"expired: {common_pb2.Purpose.Name(auth.purpose)}")
                    self.release_hold(auth, EXPIRED)
                else:
                    assert auth.expires_ms - moment > EXPIRY_MARGIN_MS, "a hold at its edge"

        # ------------------------------------------------------------ relationships

        @rule(
            pick=PICK,
            party=st.sampled_from([common_pb2.PARTY_HOLDER, common_pb2.PARTY_BENEFICIARY]),
            holding=st.booleans(),
        )
        def dissolve(self, pick: int, party: int, holding: bool) -> None:
            quotas = list(self.quotas.values())
            if holding:  # most interesting: one that funds open holds
                quotas = [q for q in quotas if self.held(q)] or quotas
            quota = quotas[pick % len(quotas)]
            observe(
                f"dissolve: {'active' if quota.active else 'dissolved'}, held {self.held(quota)}"
            )
            returned = self.dissolve_in_model(quota) if quota.active else 0
            answer = relationships.DissolveRelationship(
                relationship_pb2.DissolveRelationshipRequest(
                    relationship_id=quota.relationship_id, party=party
                ),
                metadata=APP,
            )
            assert answer.returned_fen == returned
            self.check_relationship(answer.relationship, quota)

        @rule(holder_pick=PICK, beneficiary_pick=PICK)
        def establish(self, holder_pick: int, beneficiary_pick: int) -> None:
            """A new relationship where the pair has none open and both qualify (rule 8)."""
            holder = self.holders[holder_pick % len(self.holders)]
            beneficiary = self.beneficiaries[beneficiary_pick % len(self.beneficiaries)]
            open_pair = any(
                q.active
                and q.holder == holder.participant_id
                and q.beneficiary == beneficiary.participant_id
                for q in self.quotas.values()
            )
            if open_pair or not (holder.active and beneficiary.active):
                return
            self.establish_quota(holder, beneficiary)

        @rule(
            pick=PICK,
            event=st.sampled_from([TERMINATED, TRANSFERRED, REINSTATED]),
            cause=st.sampled_from(TERMINATION_REASONS),
        )
        def insurance_event(self, pick: int, event: int, cause: int) -> None:
            people = self.holders + self.beneficiaries
            person = people[pick % len(people)]
            request = registry_pb2.ReportInsuranceEventRequest(
                participant_id=person.participant_id, event_type=event
            )
            if event == TERMINATED:
                request.termination_reason = cause
            if event == TRANSFERRED:
                request.new_pooling_region = next(r for r in REGIONS if r != person.region)
            call = lambda: registry.ReportInsuranceEvent(request, metadata=ADMIN)  # noqa: E731
            if event == TRANSFERRED and not person.active:
                self.expect_failure(call, FAILED, "PARTICIPANT_NOT_ACTIVE")
                return
            dissolved: list[str] = []
            returned = 0
            if event == REINSTATED:
                person.active = True
            elif person.active:
                if event == TERMINATED:
                    person.active = False
                else:
                    person.region = request.new_pooling_region
                for quota in list(self.quotas.values()):
                    if quota.active and person.participant_id in (quota.holder, quota.beneficiary):
                        returned += self.dissolve_in_model(quota)
                        dissolved.append(quota.relationship_id)
            observe(f"insurance event {event}: {len(dissolved)} dissolved")
            answer = call()
            assert sorted(answer.dissolved_relationship_ids) == sorted(dissolved)
            assert answer.returned_fen == returned
            assert answer.participant.pooling_region == person.region

        # ------------------------------------------------------------ checks

        def check_relationship(self, shown: relationship_pb2.Relationship, quota: Quota) -> None:
            status = (
                common_pb2.RELATIONSHIP_STATUS_ACTIVE
                if quota.active
                else common_pb2.RELATIONSHIP_STATUS_DISSOLVED
            )
            held = self.held(quota)
            spent = quota.captured - quota.refunded
            assert shown.relationship_id == quota.relationship_id
            assert shown.status == status
            assert (shown.available_fen, shown.held_fen, shown.spent_fen) == (
                quota.available,
                held,
                spent,
            ), quota
            assert shown.allocated_fen == quota.allocated - quota.released
            # The conservation rule, in the ledger's terms and in the API's.
            assert quota.allocated == (
                quota.available + held + quota.captured - quota.refunded + quota.released
            )
            assert shown.allocated_fen == shown.available_fen + shown.held_fen + shown.spent_fen

        def check_authorization(
            self, shown: A.Authorization, auth: Auth, with_times: bool = True
        ) -> None:
            assert shown.authorization_id == auth.authorization_id
            assert shown.merchant_id == auth.merchant
            assert shown.beneficiary_id == auth.beneficiary
            assert shown.purpose == auth.purpose
            assert shown.status == auth.status, (shown, auth)
            assert shown.approved_amount_fen == auth.approved
            assert shown.captured_amount_fen == auth.captured
            assert shown.refunded_amount_fen == auth.refunded
            assert [(f.relationship_id, f.amount_fen) for f in shown.funding] == auth.funding
            if with_times and auth.expires_ms:
                assert ts_ms(shown.expires_at) == auth.expires_ms

        @invariant()
        def service_agrees(self) -> None:
            if not hasattr(self, "quotas"):
                return
            for beneficiary in self.beneficiaries:
                listed = relationships.ListRelationships(
                    relationship_pb2.ListRelationshipsRequest(
                        beneficiary_id=beneficiary.participant_id
                    ),
                    metadata=APP,
                ).relationships
                mine = {q.relationship_id for q in self.quotas.values()}
                mine = {r for r in mine if self.quotas[r].beneficiary == beneficiary.participant_id}
                assert {shown.relationship_id for shown in listed} == mine
                for shown in listed:
                    self.check_relationship(shown, self.quotas[shown.relationship_id])
            for holder in self.holders:
                assert factories.balance(registry, holder.participant_id) == holder.balance
                held = [q for q in self.quotas.values() if q.holder == holder.participant_id]
                assert (
                    holder.balance + sum(q.allocated - q.released for q in held) == holder.credited
                )
            # Authorizations that a step may have changed: the ones it acted on, and every hold
            # that was open (expiry and dissolution close holds as a side effect).
            for auth in self.auths:
                if auth.status == PENDING or auth.authorization_id in self.watch:
                    self.check_stored(auth)
            self.watch = {a.authorization_id for a in self.auths if a.status == PENDING}
            spent = ledger_spent(harness, list(self.quotas))
            assert spent == {rid: q.captured - q.refunded for rid, q in self.quotas.items()}

        def check_stored(self, auth: Auth) -> None:
            shown = authorizations.GetAuthorization(
                A.GetAuthorizationRequest(authorization_id=auth.authorization_id),
                metadata=TOKENS[auth.merchant],
            ).authorization
            self.check_authorization(shown, auth)

        def teardown(self) -> None:
            for auth in getattr(self, "auths", []):
                self.check_stored(auth)

    return Engine


def test_engine_agrees_with_the_model(
    harness: Harness, registry: Any, relationships: Any, authorizations: Any
) -> None:
    run_state_machine_as_test(
        machine(harness, registry, relationships, authorizations),
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
