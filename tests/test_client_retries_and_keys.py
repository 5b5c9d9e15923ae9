"""The client's keys and resends, audited against the real service: an empty idempotency key is
refused (it was silently replaced by a fresh one, so a rerun charged again), and a write whose
repeat answers differently from its first call (DissolveRelationship, ReportInsuranceEvent: a
repeat reports 0 fen returned, no relationship dissolved) is not resent behind the caller's back
after its answer was lost."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import (
    NO_RETRIES,
    InsuranceEventType,
    MedWalletClient,
    Party,
    Purpose,
    RelationshipStatus,
    Scheme,
    TerminationReason,
    UnavailableError,
    cli,
)
from tests.harness import Harness, new_id
from tests.test_client_library import LossyProxy, family, hospital, quota


@pytest.fixture(scope="module")
def admin(harness: Harness) -> Iterator[MedWalletClient]:
    with MedWalletClient(harness.address, "test-admin") as client:
        yield client


@pytest.fixture(scope="module")
def app(admin: MedWalletClient) -> MedWalletClient:
    return admin.with_token("test-app")


@pytest.fixture
def proxies(harness: Harness) -> Iterator[list[LossyProxy]]:
    made: list[LossyProxy] = []
    yield made
    for proxy in made:
        proxy.close()


def run_cli(address: str, capsys: pytest.CaptureFixture[str], token: str, *argv: str) -> Any:
    code = cli.main(["--address", address, "--token", token, *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else None, err


# --- an empty key is not "no key" ----------------------------------------------------------------


def test_credit_csv_rerun_with_a_blank_key_does_not_credit_twice(
    harness: Harness,
    admin: MedWalletClient,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """`registry credit --csv`: a row whose idempotency_key cell is blank was sent under a fresh
    random key each run, so rerunning the file (what an operator does after a partial failure)
    credited the account again. The server itself refuses an empty key (INVALID_ARGUMENT)."""
    holder = new_id("emp")
    admin.upsert_participant(holder, Scheme.EMPLOYEE, "110100")
    credits = tmp_path / "credits.csv"
    credits.write_text(f"participant_id,amount_fen,idempotency_key\n{holder},10000,\n")
    for _ in range(2):  # the operator reruns the file
        run_cli(harness.address, capsys, "test-admin", "registry", "credit", "--csv", str(credits))
    assert admin.get_participant(holder).balance_fen in (0, 10_000)
    code, loaded, _ = run_cli(
        harness.address, capsys, "test-admin", "registry", "credit", "--csv", str(credits)
    )
    assert code == 1 and loaded["loaded"] == 0  # the row is refused, not credited
    assert loaded["rejected"][0]["line"] == 2


def test_refund_resent_with_an_empty_key_option_refunds_once(
    harness: Harness,
    admin: MedWalletClient,
    app: MedWalletClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`medwallet refund ID --amount-fen N --idempotency-key "$KEY"` from a script whose saved
    key came back empty: each resend was a new refund under a new key."""
    _, parent, _ = family(admin, app, quota_fen=50_000)
    hospital(admin)
    with MedWalletClient(harness.address, "test-merchant-a") as till:
        paid = till.authorize(parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=20_000)
        till.capture(paid.authorization_id)
    codes = []
    for _ in range(2):
        try:
            code, _, _ = run_cli(
                harness.address, capsys, "test-merchant-a",
                "refund", paid.authorization_id, "--amount-fen", "5000", "--idempotency-key", "",
            )  # fmt: skip
        except SystemExit as usage:  # argparse's usage error
            code = usage.code
        codes.append(code)
    with MedWalletClient(harness.address, "test-merchant-a") as till:
        refunded = till.get_authorization(paid.authorization_id).refunded_amount_fen
    assert refunded in (0, 5_000), f"refunded {refunded} fen for one refund of 5,000"
    assert codes == [2, 2]  # a usage error, nothing sent
    assert "idempotency-key" in capsys.readouterr().err


def test_library_refuses_an_empty_key_rather_than_inventing_one(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient
) -> None:
    """A till that persisted the key and passes it back (`idempotency_key=sale.key`) with an
    empty column got two holds for one sale."""
    _, parent, relationship_id = family(admin, app, quota_fen=50_000)
    hospital(admin)
    with MedWalletClient(harness.address, "test-merchant-a") as till:
        for _ in range(2):  # the sale, then its retry after a crash
            with contextlib.suppress(ValueError):
                till.authorize(
                    parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=20_000, idempotency_key=""
                )
    _, held, _ = quota(app, relationship_id)
    assert held in (0, 20_000), f"{held} fen held for one sale of 20,000"
    with (
        MedWalletClient(harness.address, "test-merchant-a") as till,
        pytest.raises(ValueError, match="idempotency_key"),
    ):
        till.prepare_capture("some-id", idempotency_key="")


# --- writes whose repeat answers differently -----------------------------------------------------


def test_dissolve_whose_answer_was_lost_does_not_report_zero_returned(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient, proxies: list[LossyProxy]
) -> None:
    """Dissolve served, its answer lost: the channel's retry policy resent it and the repeat
    answered `returned_fen` 0 -- the app told the holder nothing came back while 30,000 fen did."""
    holder, _, relationship_id = family(admin, app, quota_fen=30_000, balance_fen=100_000)
    proxy = LossyProxy(harness.address, drops=1)
    proxies.append(proxy)
    with MedWalletClient(proxy.address, "test-app") as channel_client:
        try:
            dissolved = channel_client.dissolve_relationship(relationship_id, Party.HOLDER)
        except UnavailableError:
            dissolved = None  # the caller knows it may have been served, and looks
    assert app.get_relationship(relationship_id).status is RelationshipStatus.DISSOLVED
    assert admin.get_participant(holder).balance_fen == 100_000  # the 30,000 came back
    if dissolved is not None:
        assert dissolved.returned_fen == 30_000, "a repeat's answer reported as the dissolve's"


def test_insurance_event_whose_answer_was_lost_does_not_report_nothing_dissolved(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient, proxies: list[LossyProxy]
) -> None:
    holder, _, relationship_id = family(admin, app, quota_fen=30_000, balance_fen=100_000)
    proxy = LossyProxy(harness.address, drops=1)
    proxies.append(proxy)
    with MedWalletClient(proxy.address, "test-admin") as operator:
        try:
            event = operator.report_insurance_event(
                holder, InsuranceEventType.TERMINATED, termination_reason=TerminationReason.DEATH
            )
        except UnavailableError:
            event = None
    assert app.get_relationship(relationship_id).status is RelationshipStatus.DISSOLVED
    if event is not None:
        assert event.dissolved_relationship_ids == (relationship_id,)
        assert event.returned_fen == 30_000


# --- plaintext off loopback ----------------------------------------------------------------------


class Eavesdropper:
    """A plaintext gRPC server on this machine's non-loopback address that answers UNAVAILABLE
    to every call and records the metadata it was sent: what anyone on the path could read."""

    def __init__(self, host: str) -> None:
        self.seen: list[dict[str, str]] = []
        outer = self

        class Handler(grpc.GenericRpcHandler):
            def service(
                self, details: grpc.HandlerCallDetails
            ) -> grpc.RpcMethodHandler[bytes, bytes]:
                outer.seen.append({k: str(v) for k, v in details.invocation_metadata})

                def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "not the service")

                return grpc.unary_unary_rpc_method_handler(refuse)

        self.server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[Handler()])
        self.port = self.server.add_insecure_port(f"{host}:0")
        self.address = f"{host}:{self.port}"
        self.server.start()

    def tokens(self) -> list[str]:
        return [seen.get("authorization", "") for seen in self.seen]


def _non_loopback_address() -> str:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
        host = str(probe.getsockname()[0])
    except OSError:
        host = ""
    finally:
        probe.close()
    if not host or ipaddress.ip_address(host).is_loopback:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return host


@pytest.fixture
def eavesdropper() -> Iterator[Eavesdropper]:
    listening = Eavesdropper(_non_loopback_address())
    yield listening
    listening.server.stop(None)


def test_client_sends_no_token_in_plaintext_off_loopback(eavesdropper: Eavesdropper) -> None:
    """`MedWalletClient("authz.hospital.lan:50051", token=...)` without credentials opened a
    plaintext channel and sent `authorization: Bearer <token>` in clear to whatever listened
    there (the README: plaintext is for loopback only)."""
    with (
        contextlib.suppress(ValueError, UnavailableError),
        MedWalletClient(eavesdropper.address, "admin-secret", retry=NO_RETRIES) as client,
    ):
        client.get_participant("someone")
    assert "Bearer admin-secret" not in eavesdropper.tokens()
    with pytest.raises(ValueError, match="plaintext"):
        MedWalletClient(eavesdropper.address, "admin-secret")
    # Loopback stays plaintext by default, and plaintext elsewhere is a choice made explicitly.
    MedWalletClient("localhost:50051", "t").close()
    MedWalletClient("127.0.0.1:50051", "t").close()
    MedWalletClient("[::1]:50051", "t").close()
    MedWalletClient(eavesdropper.address, "t", allow_plaintext=True).close()


def test_cli_sends_no_token_in_plaintext_off_loopback(
    eavesdropper: Eavesdropper, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operators' CLI had no TLS option at all: every command sent its token in clear."""
    with contextlib.suppress(SystemExit):
        cli.main(
            ["--address", eavesdropper.address, "--token", "admin-secret", "--timeout", "1",
             "registry", "get-participant", "someone"]
        )  # fmt: skip
    assert "Bearer admin-secret" not in eavesdropper.tokens()
    assert "plaintext" in capsys.readouterr().err


# --- a one-call write that failed is sent again by its operation, with its key -----------------


def test_a_refund_whose_answer_was_lost_is_sent_again_by_its_operation(
    harness: Harness, admin: MedWalletClient, app: MedWalletClient, proxies: list[LossyProxy]
) -> None:
    """`client.refund(id, n)` draws its key inside the call: a caller who calls it again after
    UnavailableError (the refund served, its answer lost) refunds twice. The error carries its
    operation instead, whose `run()` sends the same key: one refund, its first answer."""
    _, parent, _ = family(admin, app, quota_fen=50_000)
    hospital(admin)
    with MedWalletClient(harness.address, "test-merchant-a") as till:
        paid = till.authorize(parent, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=20_000)
        till.capture(paid.authorization_id)
    proxy = LossyProxy(harness.address, drops=1)
    proxies.append(proxy)
    with MedWalletClient(proxy.address, "test-merchant-a", retry=NO_RETRIES) as till:
        with pytest.raises(UnavailableError) as lost:
            till.refund(paid.authorization_id, 5_000)
        operation = lost.value.operation
        assert operation is not None and operation.name == "Refund"
        for _ in range(20):  # as a caller retries a retryable error: the same operation
            try:
                again = operation.run()
                break
            except UnavailableError:  # the channel's broken connection (this client resends
                time.sleep(0.1)  # nothing: NO_RETRIES)
    assert again.authorization.refunded_amount_fen == 5_000
    with MedWalletClient(harness.address, "test-merchant-a") as till:
        assert till.get_authorization(paid.authorization_id).refunded_amount_fen == 5_000
