"""The simulated users: tills, cashiers, collectors and family apps, weighted like real traffic.

Weights (share of simulated users): pharmacy tills 60, hospital cashiers 20, premium
collectors 8, family apps managing relationships 12. Each user works for one merchant (its
bearer token from the server's tokens file) and charges random families of the data set.

- PharmacyTill: a basket of 1-4 items, now and then with an ineligible one (partial approval),
  authorized then captured; sometimes the customer walks away (void); sometimes a look-up.
- HospitalCashier: an out-of-pocket bill authorized at admission, captured in part at
  discharge (the rest released), and later partly refunded.
- PremiumCollector: a resident premium (resident families only) or a long-term-care premium,
  paid in one step, in full or not at all.
- FamilyApp: looks at relationships; onboards a relative (participant, proposal, both
  consents, an allocation), gives part of it back, dissolves it.
- HotSpotTill (only in locustfile_hotspot.py): many tills charging the same family at once.
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from locust import between, events, task
from locust.env import Environment

from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    relationship_pb2,
    relationship_pb2_grpc,
)
from loadtest import dataset
from loadtest.dataset import Family, Workload
from loadtest.grpc_user import GrpcUser

APPROVED = (authorization_pb2.DECISION_APPROVED, authorization_pb2.DECISION_PARTIALLY_APPROVED)
# Premiums of 2024 in fen: the resident scheme's yearly contribution, a long-term-care one.
RESIDENT_PREMIUM_FEN = 40_000
LTC_PREMIUM_FEN = 9_000

_workload: Workload | None = None


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _arguments(parser: Any) -> None:
    parser.add_argument(
        "--data-dir",
        default=str(dataset.DEFAULT_DATA_DIR),
        env_var="LOADTEST_DATA_DIR",
        help="the CSV files of the data set (python -m loadtest.generate_data writes them)",
    )
    parser.add_argument(
        "--tokens-file",
        default="",
        env_var="LOADTEST_TOKENS_FILE",
        help="the server's tokens file (default: MEDWALLET_TOKENS_FILE, else data/tokens.json)",
    )


def workload(environment: Environment) -> Workload:
    """The data set, read once per Locust process."""
    global _workload
    if _workload is None:
        options = environment.parsed_options
        data_dir = Path(getattr(options, "data_dir", "") or dataset.DEFAULT_DATA_DIR)
        tokens = getattr(options, "tokens_file", "") or ""
        _workload = dataset.load_workload(
            data_dir, Path(tokens) if tokens else dataset.default_tokens_file()
        )
    return _workload


def key() -> str:
    return uuid.uuid4().hex


class MerchantUser(GrpcUser):
    """A user working for one merchant of `kind` (chosen at random among those with a token)."""

    abstract = True
    kind = ""

    def on_start(self) -> None:
        self.data = workload(self.environment)
        merchants = self.data.merchants.get(self.kind, [])
        self.merchant_id, self.token = random.choice(merchants) if merchants else ("", "")
        self.authorizations = authorization_pb2_grpc.AuthorizationServiceStub(self.channel)
        self.recent: deque[str] = deque(maxlen=50)

    def family(self) -> Family:
        return random.choice(self.data.families)

    def authorize(self, label: str, request: Any) -> Any:
        return self.call(f"Authorize {label}", self.authorizations.Authorize, request, self.token)

    def capture(self, label: str, authorization_id: str, amount_fen: int = 0) -> Any:
        request = authorization_pb2.CaptureRequest(
            authorization_id=authorization_id, amount_fen=amount_fen, idempotency_key=key()
        )
        return self.call(f"Capture {label}", self.authorizations.Capture, request, self.token)

    @task(1)
    def look_up(self) -> None:
        if self.token and self.recent:
            request = authorization_pb2.GetAuthorizationRequest(
                authorization_id=random.choice(self.recent)
            )
            self.call("GetAuthorization", self.authorizations.GetAuthorization, request, self.token)


def basket(data: Workload, ineligible: bool) -> list[authorization_pb2.AuthorizationLine]:
    lines = [
        authorization_pb2.AuthorizationLine(
            item_code=random.choice(data.eligible_items),
            quantity=(quantity := random.choice((1, 1, 1, 2, 3))),
            amount_fen=quantity * random.randrange(1_500, 30_000, 100),
        )
        for _ in range(random.choice((1, 1, 2, 2, 3, 4)))
    ]
    if ineligible and data.ineligible_items:
        lines.append(
            authorization_pb2.AuthorizationLine(
                item_code=random.choice(data.ineligible_items), quantity=1, amount_fen=8_800
            )
        )
    return lines


class PharmacyTill(MerchantUser):
    weight = 60
    kind = "RETAIL_PHARMACY"
    wait_time = between(0.5, 2.0)

    def pharmacy_request(self, family: Family) -> authorization_pb2.AuthorizeRequest:
        ineligible = random.random() < 0.1
        lines = basket(self.data, ineligible)
        return authorization_pb2.AuthorizeRequest(
            idempotency_key=key(),
            beneficiary_id=family.beneficiary_id,
            purpose=common_pb2.PURPOSE_PHARMACY,
            lines=lines,
            amount_fen=sum(line.amount_fen for line in lines),
            allow_partial=ineligible,
        )

    @task(12)
    def checkout(self) -> None:
        if not self.token:
            return
        answer = self.authorize("pharmacy", self.pharmacy_request(self.family()))
        if answer is not None and answer.decision in APPROVED:
            self.recent.append(answer.authorization_id)
            self.capture("pharmacy", answer.authorization_id)

    @task(1)
    def walk_away(self) -> None:
        if not self.token:
            return
        answer = self.authorize("pharmacy", self.pharmacy_request(self.family()))
        if answer is not None and answer.decision in APPROVED:
            request = authorization_pb2.VoidRequest(authorization_id=answer.authorization_id)
            self.call("Void pharmacy", self.authorizations.Void, request, self.token)


class HospitalCashier(MerchantUser):
    weight = 20
    kind = "MEDICAL_INSTITUTION"
    wait_time = between(1.0, 3.0)

    def on_start(self) -> None:
        super().on_start()
        self.captured: deque[tuple[str, int]] = deque(maxlen=50)

    @task(6)
    def discharge(self) -> None:
        if not self.token:
            return
        request = authorization_pb2.AuthorizeRequest(
            idempotency_key=key(),
            beneficiary_id=self.family().beneficiary_id,
            purpose=common_pb2.PURPOSE_MEDICAL_OUT_OF_POCKET,
            amount_fen=random.randrange(20_000, 300_000, 100),
            allow_partial=True,
        )
        answer = self.authorize("medical", request)
        if answer is None or answer.decision not in APPROVED:
            return
        self.recent.append(answer.authorization_id)
        # The final bill is often below the estimate held at admission.
        amount = max(1, int(answer.approved_amount_fen * random.uniform(0.7, 1.0)))
        captured = self.capture("medical (partial)", answer.authorization_id, amount)
        if captured is not None:
            self.captured.append((answer.authorization_id, amount))

    @task(1)
    def refund(self) -> None:
        if not self.token or not self.captured:
            return
        authorization_id, amount = self.captured.popleft()
        request = authorization_pb2.RefundRequest(
            authorization_id=authorization_id,
            amount_fen=max(1, amount // random.choice((2, 4, 10))),
            idempotency_key=key(),
        )
        self.call("Refund medical", self.authorizations.Refund, request, self.token)


class PremiumCollector(MerchantUser):
    weight = 8
    kind = "PREMIUM_COLLECTOR"
    wait_time = between(1.0, 3.0)

    @task(3)
    def resident_premium(self) -> None:
        residents = self.data.residents
        if not self.token or not residents:
            return
        request = authorization_pb2.AuthorizeRequest(
            idempotency_key=key(),
            beneficiary_id=random.choice(residents).beneficiary_id,
            purpose=common_pb2.PURPOSE_RESIDENT_PREMIUM,
            amount_fen=RESIDENT_PREMIUM_FEN,
            capture=True,
        )
        answer = self.authorize("resident premium", request)
        if answer is not None and answer.authorization_id:
            self.recent.append(answer.authorization_id)

    @task(1)
    def long_term_care_premium(self) -> None:
        if not self.token:
            return
        request = authorization_pb2.AuthorizeRequest(
            idempotency_key=key(),
            beneficiary_id=self.family().beneficiary_id,
            purpose=common_pb2.PURPOSE_LTC_PREMIUM,
            amount_fen=LTC_PREMIUM_FEN,
            capture=True,
        )
        self.authorize("LTC premium", request)


class FamilyApp(GrpcUser):
    """The insured's app (channel APP) and, for onboarding a relative, the registry (admin)."""

    weight = 12
    wait_time = between(1.0, 4.0)

    def on_start(self) -> None:
        self.data = workload(self.environment)
        self.relationships = relationship_pb2_grpc.RelationshipServiceStub(self.channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        # relationships this user onboarded: [id, quota still available]
        self.onboarded: deque[list[Any]] = deque(maxlen=20)

    @task(6)
    def view(self) -> None:
        token = self.data.channel_token
        if not token:
            return
        family = random.choice(self.data.families)
        request = relationship_pb2.GetRelationshipRequest(
            relationship_id=random.choice(family.relationship_ids)
        )
        self.call("GetRelationship", self.relationships.GetRelationship, request, token)
        listing = relationship_pb2.ListRelationshipsRequest(
            beneficiary_id=family.beneficiary_id, page_size=10
        )
        self.call("ListRelationships", self.relationships.ListRelationships, listing, token)

    @task(2)
    def onboard_relative(self) -> None:
        token, admin = self.data.channel_token, self.data.admin_token
        if not token or not admin or not self.data.holders:
            return
        relative = f"lt-new-{key()[:20]}"
        region = random.choice(self.data.regions())
        person = registry_pb2.UpsertParticipantRequest(
            participant_id=relative, scheme=common_pb2.SCHEME_RESIDENT, pooling_region=region
        )
        if self.call("UpsertParticipant", self.registry.UpsertParticipant, person, admin) is None:
            return
        proposal = relationship_pb2.ProposeRelationshipRequest(
            holder_id=random.choice(self.data.holders),
            beneficiary_id=relative,
            relation=common_pb2.RELATION_CHILD,
        )
        proposed = self.call(
            "ProposeRelationship", self.relationships.ProposeRelationship, proposal, token
        )
        if proposed is None:
            return
        relationship_id = proposed.relationship.relationship_id
        for party in (common_pb2.PARTY_HOLDER, common_pb2.PARTY_BENEFICIARY):
            consent = relationship_pb2.ConsentRelationshipRequest(
                relationship_id=relationship_id, party=party
            )
            if (
                self.call(
                    "ConsentRelationship", self.relationships.ConsentRelationship, consent, token
                )
                is None
            ):
                return
        allocation = relationship_pb2.AllocateQuotaRequest(
            relationship_id=relationship_id, amount_fen=2_000, idempotency_key=key()
        )
        if self.call("AllocateQuota", self.relationships.AllocateQuota, allocation, token):
            self.onboarded.append([relationship_id, allocation.amount_fen])

    @task(1)
    def give_back_part(self) -> None:
        token = self.data.channel_token
        if not token or not self.onboarded or self.onboarded[-1][1] < 500:
            return
        self.onboarded[-1][1] -= 500
        release = relationship_pb2.ReleaseQuotaRequest(
            relationship_id=self.onboarded[-1][0], amount_fen=500, idempotency_key=key()
        )
        self.call("ReleaseQuota", self.relationships.ReleaseQuota, release, token)

    @task(1)
    def dissolve(self) -> None:
        token = self.data.channel_token
        if not token or len(self.onboarded) < 3:
            return
        request = relationship_pb2.DissolveRelationshipRequest(
            relationship_id=self.onboarded.popleft()[0], party=common_pb2.PARTY_HOLDER
        )
        self.call("DissolveRelationship", self.relationships.DissolveRelationship, request, token)


class HotSpotTill(PharmacyTill):
    """Every till charges the hot family (a beneficiary with three large quotas)."""

    weight = 1
    wait_time = between(0.0, 0.2)

    def family(self) -> Family:
        hot = self.data.hot_families
        return hot[0] if hot else super().family()
