"""A typed, synchronous client of the MedWallet AuthZ service for HIS and POS integrators.

    from clients import MedWalletClient, AuthorizationLine, Purpose

    with MedWalletClient("authz.example:50051", token="pos-token") as client:
        payment = client.prepare_authorize(
            "beneficiary-1", Purpose.PHARMACY,
            lines=[AuthorizationLine("drug-amoxicillin", 1, 2_350)], allow_partial=True,
        )
        save_to_journal(payment.idempotency_key)    # before the first attempt
        result = payment.run()                       # may be run again: same key, one charge
        if result.approved:
            client.capture(result.authorization_id)

Every call has a deadline (`timeout`, 5 s unless configured or given per call) and sends
`authorization: Bearer <token>`. Every write that moves money carries an idempotency key that is
fixed once per business operation -- given by the caller, or generated when the operation is
prepared -- and sent unchanged on every gRPC retry, every resend of this client, and every
`Operation.run()`, so the service answers repeats with the original answer and charges once.
Failures raise the typed exceptions of `clients.errors`; a declined payment is a result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from authz_server.generated.medwallet.v1 import (
    authorization_pb2,
    authorization_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    relationship_pb2,
    relationship_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
)
from clients import convert, tracing
from clients.channel import Keepalive, RetryPolicy, open_channel
from clients.errors import MedWalletError, error_from_rpc, retry_delay_s
from clients.model import (
    Authorization,
    AuthorizationLine,
    AuthorizeResult,
    CatalogItem,
    CreditResult,
    DissolveResult,
    InsuranceEventResult,
    InsuranceEventType,
    Merchant,
    Participant,
    Party,
    Purpose,
    QuotaMoveResult,
    RefundResult,
    Relation,
    Relationship,
    RelationshipPage,
    Scheme,
    TerminationReason,
    UpsertParticipantResult,
    check_fen,
    new_idempotency_key,
)

R = TypeVar("R")
Request = TypeVar("Request")
Response = TypeVar("Response")

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRY = RetryPolicy()
DEFAULT_KEEPALIVE = Keepalive()
MAX_ITEMS_PER_CALL = 1000


def operation_key(idempotency_key: str | None, prefix: str) -> str:
    """The key an operation is sent with: the caller's, or a new one when none (None) is given.
    An empty key is refused, never replaced: it is what a resend with a lost or blank saved key
    looks like (a CSV cell, a database column, an unset shell variable), and a new key there
    would make the resend a second payment, credit or refund. The service refuses an empty key
    too (INVALID_ARGUMENT)."""
    if idempotency_key is None:
        return new_idempotency_key(prefix)
    if not idempotency_key:
        raise ValueError(
            "idempotency_key must not be empty: leave it out (None) for a new operation, or "
            "give the key the operation was first sent with"
        )
    return idempotency_key


class Operation(Generic[R]):
    """One business operation with its idempotency key fixed. `run()` sends it; running it again
    (after UnavailableError, DeadlineExceededError, or in a new process with the key persisted
    and passed to the `prepare_*` method) sends the same request with the same key, and the
    service answers with the original result instead of acting twice."""

    def __init__(self, name: str, idempotency_key: str, send: Callable[[float | None], R]) -> None:
        self._name = name
        self._idempotency_key = idempotency_key
        self._send = send

    @property
    def name(self) -> str:
        return self._name

    @property
    def idempotency_key(self) -> str:
        return self._idempotency_key

    def run(self, timeout: float | None = None) -> R:
        """Sends it. A MedWalletError it raises carries it (`error.operation`), so a caller of
        the one-call forms (`client.capture`, `client.refund`, ...) can send the same operation
        again, with the same key, after a retryable error."""
        try:
            return self._send(timeout)
        except MedWalletError as error:
            error.operation = self
            raise

    def __repr__(self) -> str:
        return f"Operation({self._name!r}, idempotency_key={self._idempotency_key!r})"


class MedWalletClient:
    """A client over one channel. Thread-safe (gRPC channels are); close it, or use `with`."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = DEFAULT_RETRY,
        keepalive: Keepalive = DEFAULT_KEEPALIVE,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        allow_plaintext: bool = False,
    ) -> None:
        """Without `credentials` the channel is plaintext, which is refused (ValueError) to an
        address that is not loopback unless `allow_plaintext`."""
        channel = open_channel(
            address,
            retry=retry,
            keepalive=keepalive,
            credentials=credentials,
            options=options,
            allow_plaintext=allow_plaintext,
        )
        self._setup(channel, token, timeout, retry, owns_channel=True)

    @classmethod
    def from_channel(
        cls,
        channel: grpc.Channel,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> MedWalletClient:
        """A client on a channel the caller opened (and closes). Its gRPC retry policy is the
        channel's own; `retry` only sets this client's resends."""
        client = cls.__new__(cls)
        client._setup(channel, token, timeout, retry, owns_channel=False)
        return client

    def _setup(
        self,
        channel: grpc.Channel,
        token: str | None,
        timeout: float,
        retry: RetryPolicy,
        *,
        owns_channel: bool,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._channel = channel
        self._owns_channel = owns_channel
        self._token = token
        self._timeout = timeout
        self._retry = retry
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._authorizations = authorization_pb2_grpc.AuthorizationServiceStub(channel)
        self._relationships = relationship_pb2_grpc.RelationshipServiceStub(channel)
        self._registry = registry_pb2_grpc.RegistryServiceStub(channel)
        self._settlement = settlement_pb2_grpc.SettlementServiceStub(channel)

    def with_token(self, token: str) -> MedWalletClient:
        """Another client on the same channel, calling as another principal."""
        return MedWalletClient.from_channel(
            self._channel, token, timeout=self._timeout, retry=self._retry
        )

    @property
    def timeout(self) -> float:
        return self._timeout

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> MedWalletClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- the call path -------------------------------------------------------------------------

    def _invoke(
        self,
        method: grpc.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        timeout: float | None,
        *,
        resend: bool = True,
    ) -> Response:
        """One call with a deadline and the token; after gRPC's own retries of UNAVAILABLE are
        spent, resends the *same* request message (so the same idempotency key) `resends` times.
        Raises a `clients.errors.MedWalletError`."""
        attempts = 1 + (self._retry.resends if resend else 0)
        limited_left = self._retry.limited_resends
        delay = self._retry.resend_backoff_s
        with tracing.client_span(method, request) as trace_metadata:  # one span, all resends
            metadata = self._metadata + trace_metadata
            attempt = 0
            while True:
                attempt += 1
                try:
                    return method(request, timeout=timeout or self._timeout, metadata=metadata)
                except grpc.RpcError as error:
                    # over the principal's limit: refused before anything was done, so resent
                    # after the delay the server's RetryInfo asks for
                    asked = retry_delay_s(error)
                    if asked is not None and limited_left > 0:
                        limited_left -= 1
                        attempt -= 1
                        time.sleep(min(asked, self._retry.max_retry_info_wait_s))
                        continue
                    unavailable = (
                        isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.UNAVAILABLE
                    )
                    if not unavailable or attempt >= attempts:
                        raise error_from_rpc(error) from error
                time.sleep(delay)
                delay = min(delay * self._retry.backoff_multiplier, self._retry.max_backoff_s)

    # --- AuthorizationService (merchant token) ------------------------------------------------

    def prepare_authorize(
        self,
        beneficiary_id: str,
        purpose: Purpose,
        *,
        amount_fen: int | None = None,
        lines: Iterable[AuthorizationLine] = (),
        relationship_id: str = "",
        allow_partial: bool = False,
        capture: bool = False,
        idempotency_key: str | None = None,
    ) -> Operation[AuthorizeResult]:
        """An Authorize, ready to run. `amount_fen` defaults to the sum of `lines` (pharmacy
        baskets); without lines it is required. `capture` authorizes and captures in one step
        (premiums always are). Pass `idempotency_key` to resend an operation started earlier."""
        basket = tuple(lines)
        if amount_fen is None:
            if not basket:
                raise ValueError("amount_fen is required when there are no lines")
            amount_fen = sum(line.amount_fen for line in basket)
        check_fen("amount_fen", amount_fen)
        key = operation_key(idempotency_key, "auth-")
        request = authorization_pb2.AuthorizeRequest(
            idempotency_key=key,
            beneficiary_id=beneficiary_id,
            relationship_id=relationship_id,
            purpose=convert.proto_enum(purpose),
            lines=[convert.line_message(line) for line in basket],
            amount_fen=amount_fen,
            allow_partial=allow_partial,
            capture=capture,
        )

        def send(timeout: float | None) -> AuthorizeResult:
            response = self._invoke(self._authorizations.Authorize, request, timeout)
            return convert.authorize_result(response, key)

        return Operation("Authorize", key, send)

    def authorize(
        self,
        beneficiary_id: str,
        purpose: Purpose,
        *,
        amount_fen: int | None = None,
        lines: Iterable[AuthorizationLine] = (),
        relationship_id: str = "",
        allow_partial: bool = False,
        capture: bool = False,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> AuthorizeResult:
        """Places a hold (or, with `capture`, pays at once). A refusal by the payment rules is a
        result with decision DECLINED, not an exception."""
        return self.prepare_authorize(
            beneficiary_id,
            purpose,
            amount_fen=amount_fen,
            lines=lines,
            relationship_id=relationship_id,
            allow_partial=allow_partial,
            capture=capture,
            idempotency_key=idempotency_key,
        ).run(timeout)

    def prepare_capture(
        self, authorization_id: str, amount_fen: int = 0, *, idempotency_key: str | None = None
    ) -> Operation[Authorization]:
        """A Capture of `amount_fen` (0: all that was approved); the rest returns to the quota."""
        check_fen("amount_fen", amount_fen)
        key = operation_key(idempotency_key, "capture-")
        request = authorization_pb2.CaptureRequest(
            authorization_id=authorization_id, amount_fen=amount_fen, idempotency_key=key
        )

        def send(timeout: float | None) -> Authorization:
            response = self._invoke(self._authorizations.Capture, request, timeout)
            return convert.authorization(response.authorization)

        return Operation("Capture", key, send)

    def capture(
        self,
        authorization_id: str,
        amount_fen: int = 0,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Authorization:
        return self.prepare_capture(
            authorization_id, amount_fen, idempotency_key=idempotency_key
        ).run(timeout)

    def void(self, authorization_id: str, *, timeout: float | None = None) -> Authorization:
        """Gives the hold back. Voiding a voided authorization answers it again."""
        request = authorization_pb2.VoidRequest(authorization_id=authorization_id)
        response = self._invoke(self._authorizations.Void, request, timeout)
        return convert.authorization(response.authorization)

    def prepare_refund(
        self, authorization_id: str, amount_fen: int, *, idempotency_key: str | None = None
    ) -> Operation[RefundResult]:
        """A Refund of up to captured minus refunded; it goes back last-drawn part first."""
        check_fen("amount_fen", amount_fen)
        key = operation_key(idempotency_key, "refund-")
        request = authorization_pb2.RefundRequest(
            authorization_id=authorization_id, amount_fen=amount_fen, idempotency_key=key
        )

        def send(timeout: float | None) -> RefundResult:
            return convert.refund_result(
                self._invoke(self._authorizations.Refund, request, timeout)
            )

        return Operation("Refund", key, send)

    def refund(
        self,
        authorization_id: str,
        amount_fen: int,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> RefundResult:
        return self.prepare_refund(
            authorization_id, amount_fen, idempotency_key=idempotency_key
        ).run(timeout)

    def get_authorization(
        self, authorization_id: str, *, timeout: float | None = None
    ) -> Authorization:
        request = authorization_pb2.GetAuthorizationRequest(authorization_id=authorization_id)
        response = self._invoke(self._authorizations.GetAuthorization, request, timeout)
        return convert.authorization(response.authorization)

    # --- RelationshipService (channel token) ---------------------------------------------------

    def propose_relationship(
        self,
        holder_id: str,
        beneficiary_id: str,
        relation: Relation,
        *,
        timeout: float | None = None,
    ) -> Relationship:
        """Proposes a sharing relationship. Has no idempotency key, so it is never retried or
        resent: after an UnavailableError, look with `list_relationships` before proposing again."""
        request = relationship_pb2.ProposeRelationshipRequest(
            holder_id=holder_id,
            beneficiary_id=beneficiary_id,
            relation=convert.proto_enum(relation),
        )
        response = self._invoke(
            self._relationships.ProposeRelationship, request, timeout, resend=False
        )
        return convert.relationship(response.relationship)

    def consent_relationship(
        self, relationship_id: str, party: Party, *, timeout: float | None = None
    ) -> Relationship:
        request = relationship_pb2.ConsentRelationshipRequest(
            relationship_id=relationship_id, party=convert.proto_enum(party)
        )
        response = self._invoke(self._relationships.ConsentRelationship, request, timeout)
        return convert.relationship(response.relationship)

    def _prepare_quota_move(
        self,
        name: str,
        method: grpc.UnaryUnaryMultiCallable[Any, Any],
        request_type: Callable[..., Any],
        relationship_id: str,
        amount_fen: int,
        idempotency_key: str | None,
    ) -> Operation[QuotaMoveResult]:
        check_fen("amount_fen", amount_fen)
        key = operation_key(idempotency_key, f"{name.lower()}-")
        request = request_type(
            relationship_id=relationship_id, amount_fen=amount_fen, idempotency_key=key
        )

        def send(timeout: float | None) -> QuotaMoveResult:
            response = self._invoke(method, request, timeout)
            return QuotaMoveResult(
                convert.relationship(response.relationship), int(response.holder_balance_fen)
            )

        return Operation(name, key, send)

    def prepare_allocate_quota(
        self, relationship_id: str, amount_fen: int, *, idempotency_key: str | None = None
    ) -> Operation[QuotaMoveResult]:
        """Moves money from the holder's personal account into the relationship's quota."""
        return self._prepare_quota_move(
            "Allocate",
            self._relationships.AllocateQuota,
            relationship_pb2.AllocateQuotaRequest,
            relationship_id,
            amount_fen,
            idempotency_key,
        )

    def allocate_quota(
        self,
        relationship_id: str,
        amount_fen: int,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> QuotaMoveResult:
        return self.prepare_allocate_quota(
            relationship_id, amount_fen, idempotency_key=idempotency_key
        ).run(timeout)

    def prepare_release_quota(
        self, relationship_id: str, amount_fen: int, *, idempotency_key: str | None = None
    ) -> Operation[QuotaMoveResult]:
        """Moves unused (available, unheld) quota back to the holder's personal account."""
        return self._prepare_quota_move(
            "Release",
            self._relationships.ReleaseQuota,
            relationship_pb2.ReleaseQuotaRequest,
            relationship_id,
            amount_fen,
            idempotency_key,
        )

    def release_quota(
        self,
        relationship_id: str,
        amount_fen: int,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> QuotaMoveResult:
        return self.prepare_release_quota(
            relationship_id, amount_fen, idempotency_key=idempotency_key
        ).run(timeout)

    def dissolve_relationship(
        self, relationship_id: str, party: Party, *, timeout: float | None = None
    ) -> DissolveResult:
        """Dissolves; `returned_fen` is what went back to the holder. Never retried or resent:
        a repeat answers `returned_fen` 0, which would be taken for this call's answer. After an
        UnavailableError or DeadlineExceededError, look with `get_relationship` (dissolving
        again is harmless, but its `returned_fen` is then 0)."""
        request = relationship_pb2.DissolveRelationshipRequest(
            relationship_id=relationship_id, party=convert.proto_enum(party)
        )
        response = self._invoke(
            self._relationships.DissolveRelationship, request, timeout, resend=False
        )
        return DissolveResult(convert.relationship(response.relationship), response.returned_fen)

    def get_relationship(
        self, relationship_id: str, *, timeout: float | None = None
    ) -> Relationship:
        request = relationship_pb2.GetRelationshipRequest(relationship_id=relationship_id)
        response = self._invoke(self._relationships.GetRelationship, request, timeout)
        return convert.relationship(response.relationship)

    def list_relationships(
        self,
        *,
        holder_id: str | None = None,
        beneficiary_id: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> RelationshipPage:
        """One page of a holder's or a beneficiary's relationships (give exactly one)."""
        if (holder_id is None) == (beneficiary_id is None):
            raise ValueError("give exactly one of holder_id and beneficiary_id")
        request = relationship_pb2.ListRelationshipsRequest(
            page_size=page_size, page_token=page_token
        )
        if holder_id is not None:
            request.holder_id = holder_id
        else:
            request.beneficiary_id = beneficiary_id or ""
        response = self._invoke(self._relationships.ListRelationships, request, timeout)
        return RelationshipPage(
            tuple(convert.relationship(r) for r in response.relationships),
            response.next_page_token,
        )

    def iter_relationships(
        self,
        *,
        holder_id: str | None = None,
        beneficiary_id: str | None = None,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> Iterator[Relationship]:
        """Every relationship of a holder or a beneficiary, page after page."""
        token = ""
        while True:
            page = self.list_relationships(
                holder_id=holder_id,
                beneficiary_id=beneficiary_id,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            )
            yield from page.relationships
            if not page.next_page_token:
                return
            token = page.next_page_token

    # --- RegistryService (admin token) ---------------------------------------------------------

    def upsert_participant(
        self,
        participant_id: str,
        scheme: Scheme,
        pooling_region: str,
        *,
        timeout: float | None = None,
    ) -> UpsertParticipantResult:
        request = registry_pb2.UpsertParticipantRequest(
            participant_id=participant_id,
            scheme=convert.proto_enum(scheme),
            pooling_region=pooling_region,
        )
        response = self._invoke(self._registry.UpsertParticipant, request, timeout)
        return UpsertParticipantResult(convert.participant(response.participant), response.created)

    def get_participant(self, participant_id: str, *, timeout: float | None = None) -> Participant:
        request = registry_pb2.GetParticipantRequest(participant_id=participant_id)
        response = self._invoke(self._registry.GetParticipant, request, timeout)
        return convert.participant(response.participant)

    def prepare_credit_personal_account(
        self, participant_id: str, amount_fen: int, *, idempotency_key: str | None = None
    ) -> Operation[CreditResult]:
        check_fen("amount_fen", amount_fen)
        key = operation_key(idempotency_key, "credit-")
        request = registry_pb2.CreditPersonalAccountRequest(
            participant_id=participant_id, amount_fen=amount_fen, idempotency_key=key
        )

        def send(timeout: float | None) -> CreditResult:
            response = self._invoke(self._registry.CreditPersonalAccount, request, timeout)
            return CreditResult(response.balance_fen, response.ledger_entry_id)

        return Operation("CreditPersonalAccount", key, send)

    def credit_personal_account(
        self,
        participant_id: str,
        amount_fen: int,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> CreditResult:
        return self.prepare_credit_personal_account(
            participant_id, amount_fen, idempotency_key=idempotency_key
        ).run(timeout)

    def report_insurance_event(
        self,
        participant_id: str,
        event_type: InsuranceEventType,
        *,
        termination_reason: TerminationReason = TerminationReason.UNSPECIFIED,
        new_pooling_region: str = "",
        new_scheme: Scheme = Scheme.UNSPECIFIED,
        timeout: float | None = None,
    ) -> InsuranceEventResult:
        """Never retried or resent: a repeat is a no-op answering no relationship dissolved and
        `returned_fen` 0, which would be taken for this call's answer. After an UnavailableError
        or DeadlineExceededError, look with `get_participant` and the relationships."""
        request = registry_pb2.ReportInsuranceEventRequest(
            participant_id=participant_id,
            event_type=convert.proto_enum(event_type),
            termination_reason=convert.proto_enum(termination_reason),
            new_pooling_region=new_pooling_region,
            new_scheme=convert.proto_enum(new_scheme),
        )
        response = self._invoke(self._registry.ReportInsuranceEvent, request, timeout, resend=False)
        return InsuranceEventResult(
            convert.participant(response.participant),
            tuple(response.dissolved_relationship_ids),
            response.returned_fen,
        )

    def upsert_merchant(self, merchant: Merchant, *, timeout: float | None = None) -> Merchant:
        request = registry_pb2.UpsertMerchantRequest(merchant=convert.merchant_message(merchant))
        response = self._invoke(self._registry.UpsertMerchant, request, timeout)
        return convert.merchant(response.merchant)

    def upsert_catalog_items(
        self, items: Iterable[CatalogItem], *, timeout: float | None = None
    ) -> int:
        """Inserts or updates catalog items, 1000 a call; returns how many were upserted."""
        total = 0
        batch: list[CatalogItem] = []
        for item in items:
            batch.append(item)
            if len(batch) == MAX_ITEMS_PER_CALL:
                total += self._upsert_items(batch, timeout)
                batch = []
        if batch:
            total += self._upsert_items(batch, timeout)
        return total

    def _upsert_items(self, batch: list[CatalogItem], timeout: float | None) -> int:
        request = registry_pb2.UpsertCatalogItemsRequest(
            items=[convert.item_message(item) for item in batch]
        )
        return self._invoke(self._registry.UpsertCatalogItems, request, timeout).upserted_count

    # --- SettlementService (admin token) ------------------------------------------------------

    def close_month(
        self, month: str, *, timeout: float | None = None
    ) -> settlement_pb2.CloseMonthResponse:
        """Closes a month ("YYYY-MM", Beijing time) and answers its report; closing it again
        answers the stored report with `already_closed`. The report is the contract's message
        (its tables are long; `clients.cli` prints it as JSON)."""
        request = settlement_pb2.CloseMonthRequest(month=month)
        return self._invoke(self._settlement.CloseMonth, request, timeout or 60.0)

    def get_settlement_report(
        self, month: str, *, timeout: float | None = None
    ) -> settlement_pb2.SettlementReport:
        """A closed month's report (NOT_FOUND for a month not closed)."""
        request = settlement_pb2.GetSettlementReportRequest(month=month)
        return self._invoke(self._settlement.GetSettlementReport, request, timeout).report
