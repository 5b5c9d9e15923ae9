"""The command line for operators and demos, on top of MedWalletClient; prints JSON.

    medwallet --token demo-pharmacy authorize --beneficiary demo-parent-li \\
        --purpose pharmacy --line drug-amoxicillin:2:4700 --line cosmetic-face-cream:1:8800 \\
        --allow-partial
    medwallet --token demo-pharmacy capture <authorization_id>
    medwallet --token demo-app relationship list --holder demo-holder-zhang
    medwallet --token demo-admin registry items --csv items.csv

`--address` (or MEDWALLET_ADDRESS, default localhost:50051), `--token` (or MEDWALLET_TOKEN);
TLS with `--ca-file` (and `--cert-file`/`--key-file` for mutual TLS); plaintext to an address
that is not loopback only with `--plaintext`.
Amounts are integer fen. Writes that move money print the idempotency key they were sent with;
after a failure (the error as JSON on stderr with that key; the exit status says its class:
clients/errors.py EXIT_CODES) send the same command again with `--idempotency-key KEY` to
finish it without acting twice. Usage errors exit 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from clients.errors import EXIT_CODES_HELP, MedWalletError, exit_code
from clients.medwallet_client import MedWalletClient, Operation
from clients.model import (
    AuthorizationLine,
    CatalogItem,
    InsuranceEventType,
    ItemCategory,
    Merchant,
    MerchantKind,
    Party,
    Purpose,
    Relation,
    Scheme,
    TerminationReason,
)

E = TypeVar("E", bound=Enum)
DEFAULT_ADDRESS = "localhost:50051"


class UsageError(Exception):
    """Bad input found after parsing (a CSV row, a missing argument): exit 2."""


# --- argument types ----------------------------------------------------------------------------


def _spelling(member: Enum) -> str:
    return member.name.lower().replace("_", "-")


def enum_type(kind: type[E]) -> Callable[[str], E]:
    """An argparse type accepting a member name in any case, with '-' or '_' ('retail-pharmacy',
    'RETAIL_PHARMACY'), or a unique short form ('medical' for MEDICAL_OUT_OF_POCKET)."""
    members = [member for member in kind if member.name != "UNSPECIFIED"]

    def parse(text: str) -> E:
        wanted = text.strip().upper().replace("-", "_")
        for member in members:
            if member.name == wanted:
                return member
        prefixed = [member for member in members if member.name.startswith(wanted + "_")]
        if wanted and len(prefixed) == 1:
            return prefixed[0]
        choices = ", ".join(_spelling(member) for member in members)
        raise argparse.ArgumentTypeError(f"{text!r} is not one of: {choices}")

    parse.__name__ = kind.__name__
    return parse


def fen_type(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of fen") from None
    return value


def key_type(text: str) -> str:
    """An idempotency key to finish an operation with: never empty (an unset variable in a
    script, `--idempotency-key "$KEY"`, must not become a new operation under a new key)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty key: give the key the operation was sent with")
    return text


def line_type(text: str) -> AuthorizationLine:
    """ITEM_CODE:QUANTITY:AMOUNT_FEN, e.g. drug-amoxicillin:2:4700."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not ITEM_CODE:QUANTITY:AMOUNT_FEN")
    code, quantity, amount = parts
    try:
        return AuthorizationLine(code, int(quantity, 10), int(amount, 10))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: quantity and amount must be whole numbers"
        ) from None


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise ValueError(f"{text!r} is not true/false")


def item_type(text: str) -> CatalogItem:
    """ITEM_CODE:CATEGORY:ELIGIBLE[:NAME], e.g. drug-x:drug:true:Amoxicillin."""
    parts = text.split(":", 3)
    if len(parts) < 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not ITEM_CODE:CATEGORY:ELIGIBLE[:NAME]")
    try:
        category = enum_type(ItemCategory)(parts[1])
        eligible = _boolean(parts[2])
    except (argparse.ArgumentTypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return CatalogItem(parts[0], category, eligible, parts[3] if len(parts) == 4 else "")


# --- output ------------------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def as_data(value: object) -> Any:
    """A result as JSON-ready data: dataclasses as objects, enums by name, datetimes ISO 8601."""
    if isinstance(value, Message):  # the contract's own message (settlement reports)
        return json_format.MessageToDict(
            value,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            unquote_int64_if_possible=True,
        )
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json.loads(json.dumps(dataclasses.asdict(value), default=_json_default))
    return json.loads(json.dumps(value, default=_json_default))


def emit(value: object, stream: Any = None) -> None:
    print(json.dumps(as_data(value), ensure_ascii=False, indent=2), file=stream or sys.stdout)


# --- commands ----------------------------------------------------------------------------------


class Failure(Exception):
    """A failed call, with the idempotency key to finish it with (when it had one)."""

    def __init__(self, error: MedWalletError, idempotency_key: str | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.idempotency_key = idempotency_key


def run_keyed(operation: Operation[Any]) -> dict[str, Any]:
    try:
        result = operation.run()
    except MedWalletError as error:
        raise Failure(error, operation.idempotency_key) from error
    shown = as_data(result)
    return {"idempotency_key": operation.idempotency_key, **shown}


def cmd_authorize(client: MedWalletClient, args: argparse.Namespace) -> object:
    if args.amount_fen is None and not args.line:
        raise UsageError("authorize: give --amount-fen, or basket lines with --line")
    operation = client.prepare_authorize(
        args.beneficiary,
        args.purpose,
        amount_fen=args.amount_fen,
        lines=args.line or (),
        relationship_id=args.relationship or "",
        allow_partial=args.allow_partial,
        capture=args.capture,
        idempotency_key=args.idempotency_key,
    )
    try:
        return operation.run()
    except MedWalletError as error:
        raise Failure(error, operation.idempotency_key) from error


def cmd_capture(client: MedWalletClient, args: argparse.Namespace) -> object:
    return run_keyed(
        client.prepare_capture(
            args.authorization_id, args.amount_fen, idempotency_key=args.idempotency_key
        )
    )


def cmd_void(client: MedWalletClient, args: argparse.Namespace) -> object:
    return client.void(args.authorization_id)


def cmd_refund(client: MedWalletClient, args: argparse.Namespace) -> object:
    return run_keyed(
        client.prepare_refund(
            args.authorization_id, args.amount_fen, idempotency_key=args.idempotency_key
        )
    )


def cmd_get(client: MedWalletClient, args: argparse.Namespace) -> object:
    return client.get_authorization(args.authorization_id)


def cmd_close_month(client: MedWalletClient, args: argparse.Namespace) -> object:
    return client.close_month(args.month)


def cmd_settlement_report(client: MedWalletClient, args: argparse.Namespace) -> object:
    return client.get_settlement_report(args.month)


def cmd_propose(client: MedWalletClient, args: argparse.Namespace) -> object:
    return client.propose_relationship(args.holder, args.beneficiary, args.relation)


def cmd_consent(client: MedWalletClient, args: argparse.Namespace) -> object:
    return client.consent_relationship(args.relationship_id, args.party)


def cmd_allocate(client: MedWalletClient, args: argparse.Namespace) -> object:
    return run_keyed(
        client.prepare_allocate_quota(
            args.relationship_id, args.amount_fen, idempotency_key=args.idempotency_key
        )
    )


def cmd_release(client: MedWalletClient, args: argparse.Namespace) -> object:
    return run_keyed(
        client.prepare_release_quota(
            args.relationship_id, args.amount_fen, idempotency_key=args.idempotency_key
        )
    )


def cmd_dissolve(client: MedWalletClient, args: argparse.Namespace) -> object:
    return client.dissolve_relationship(args.relationship_id, args.party)


def cmd_relationship_get(client: MedWalletClient, args: argparse.Namespace) -> object:
    return client.get_relationship(args.relationship_id)


def cmd_list(client: MedWalletClient, args: argparse.Namespace) -> object:
    if args.all:
        found = client.iter_relationships(
            holder_id=args.holder, beneficiary_id=args.beneficiary, page_size=args.page_size or 100
        )
        return {"relationships": [as_data(r) for r in found], "next_page_token": ""}
    return client.list_relationships(
        holder_id=args.holder,
        beneficiary_id=args.beneficiary,
        page_size=args.page_size,
        page_token=args.page_token,
    )


def read_csv(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each non-blank row; the header must name exactly `columns`."""
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        if sorted(reader.fieldnames or []) != sorted(columns):
            raise UsageError(f"{path}: the header must be exactly {','.join(columns)}")
        for row in reader:
            if all(not (value or "").strip() for value in row.values()):
                continue
            yield reader.line_num, {key: value or "" for key, value in row.items()}


def load_rows(
    path: Path, columns: Sequence[str], load_one: Callable[[dict[str, str]], object]
) -> dict[str, Any]:
    """Calls `load_one` for every row; a refused row is reported and the rest still load."""
    loaded = 0
    rejected: list[dict[str, Any]] = []
    for line, row in read_csv(path, columns):
        try:
            load_one(row)
            loaded += 1
        except MedWalletError as error:
            rejected.append({"line": line, "error": error.to_dict()})
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            rejected.append({"line": line, "error": {"code": "BAD_ROW", "message": str(error)}})
    return {"file": str(path), "loaded": loaded, "rejected": rejected}


def _require(args: argparse.Namespace, needed: dict[str, str], command: str) -> None:
    """Refuses a single-record registry command missing one of `needed` (attribute -> shown)."""
    missing = [shown for name, shown in needed.items() if getattr(args, name) is None]
    if missing:
        raise UsageError(f"registry {command}: give --csv, or {' '.join(missing)}")


def cmd_participant(client: MedWalletClient, args: argparse.Namespace) -> object:
    if args.csv:
        return load_rows(
            args.csv,
            ("participant_id", "scheme", "pooling_region"),
            lambda row: client.upsert_participant(
                row["participant_id"], enum_type(Scheme)(row["scheme"]), row["pooling_region"]
            ),
        )
    _require(
        args,
        {"participant_id": "PARTICIPANT_ID", "scheme": "--scheme", "region": "--region"},
        "participant",
    )
    return client.upsert_participant(args.participant_id, args.scheme, args.region)


def cmd_get_participant(client: MedWalletClient, args: argparse.Namespace) -> object:
    return client.get_participant(args.participant_id)


def cmd_credit(client: MedWalletClient, args: argparse.Namespace) -> object:
    if args.csv:
        return load_rows(
            args.csv,
            ("participant_id", "amount_fen", "idempotency_key"),
            lambda row: client.credit_personal_account(
                row["participant_id"],
                fen_type(row["amount_fen"]),
                idempotency_key=row["idempotency_key"],
            ),
        )
    _require(args, {"participant_id": "PARTICIPANT_ID", "amount_fen": "--amount-fen"}, "credit")
    return run_keyed(
        client.prepare_credit_personal_account(
            args.participant_id, args.amount_fen, idempotency_key=args.idempotency_key
        )
    )


def cmd_merchant(client: MedWalletClient, args: argparse.Namespace) -> object:
    if args.csv:
        return load_rows(
            args.csv,
            ("merchant_id", "kind", "pooling_region", "designated", "name"),
            lambda row: client.upsert_merchant(
                Merchant(
                    row["merchant_id"],
                    enum_type(MerchantKind)(row["kind"]),
                    row["pooling_region"],
                    _boolean(row["designated"]),
                    row["name"],
                )
            ),
        )
    _require(
        args,
        {"merchant_id": "MERCHANT_ID", "kind": "--kind", "region": "--region"},
        "merchant",
    )
    merchant = Merchant(
        args.merchant_id, args.kind, args.region, not args.not_designated, args.name or ""
    )
    return client.upsert_merchant(merchant)


def cmd_items(client: MedWalletClient, args: argparse.Namespace) -> object:
    items: list[CatalogItem] = list(args.item or ())
    if args.csv:
        for line, row in read_csv(args.csv, ("item_code", "name", "category", "eligible")):
            try:
                category = enum_type(ItemCategory)(row["category"])
                eligible = _boolean(row["eligible"])
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise UsageError(f"{args.csv}:{line}: {error}") from None
            items.append(CatalogItem(row["item_code"], category, eligible, row["name"]))
    if not items:
        raise UsageError("registry items: give --csv or at least one --item")
    return {"upserted_count": client.upsert_catalog_items(items)}


def cmd_event(client: MedWalletClient, args: argparse.Namespace) -> object:
    return client.report_insurance_event(
        args.participant_id,
        args.type,
        termination_reason=args.termination_reason or TerminationReason.UNSPECIFIED,
        new_pooling_region=args.new_region or "",
        new_scheme=args.new_scheme or Scheme.UNSPECIFIED,
    )


# --- the parser --------------------------------------------------------------------------------


def _choices(kind: type[Enum]) -> str:
    return "|".join(_spelling(member) for member in kind if member.name != "UNSPECIFIED")


def _key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--idempotency-key",
        type=key_type,
        metavar="KEY",
        help="resend an operation started earlier with this key (default: a new key)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medwallet",
        description="Call the MedWallet AuthZ service; results are printed as JSON.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("MEDWALLET_ADDRESS", DEFAULT_ADDRESS),
        help=f"host:port of the service (MEDWALLET_ADDRESS, default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("MEDWALLET_TOKEN"),
        help="bearer token (default: MEDWALLET_TOKEN)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="deadline of each call in seconds (5)"
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=os.environ.get("MEDWALLET_CA_FILE"),
        help="TLS: the CA bundle to verify the service with (MEDWALLET_CA_FILE)",
    )
    parser.add_argument(
        "--cert-file",
        type=Path,
        default=os.environ.get("MEDWALLET_CERT_FILE"),
        help="mutual TLS: this client's certificate (MEDWALLET_CERT_FILE; with --key-file)",
    )
    parser.add_argument(
        "--key-file",
        type=Path,
        default=os.environ.get("MEDWALLET_KEY_FILE"),
        help="mutual TLS: this client's private key (MEDWALLET_KEY_FILE)",
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        help="allow plaintext to an address that is not loopback (refused by default: the "
        "token would cross the network in clear)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    authorize = commands.add_parser("authorize", help="place a hold (or pay, with --capture)")
    authorize.add_argument("--beneficiary", required=True)
    authorize.add_argument(
        "--purpose", required=True, type=enum_type(Purpose), metavar=_choices(Purpose)
    )
    authorize.add_argument(
        "--amount-fen", type=fen_type, help="the total (default: the sum of the lines)"
    )
    authorize.add_argument(
        "--line",
        action="append",
        type=line_type,
        metavar="CODE:QTY:FEN",
        help="a basket line (repeat for each)",
    )
    authorize.add_argument("--relationship", help="charge this relationship's quota only")
    authorize.add_argument("--allow-partial", action="store_true")
    authorize.add_argument("--capture", action="store_true", help="authorize and capture at once")
    _key_option(authorize)
    authorize.set_defaults(handler=cmd_authorize)

    capture = commands.add_parser("capture", help="capture an authorization (all or part)")
    capture.add_argument("authorization_id")
    capture.add_argument("--amount-fen", type=fen_type, default=0, help="0 (default): all")
    _key_option(capture)
    capture.set_defaults(handler=cmd_capture)

    void = commands.add_parser("void", help="give a hold back")
    void.add_argument("authorization_id")
    void.set_defaults(handler=cmd_void)

    refund = commands.add_parser("refund", help="refund part or all of a capture")
    refund.add_argument("authorization_id")
    refund.add_argument("--amount-fen", type=fen_type, required=True)
    _key_option(refund)
    refund.set_defaults(handler=cmd_refund)

    get = commands.add_parser("get", help="show an authorization")
    get.add_argument("authorization_id")
    get.set_defaults(handler=cmd_get)

    relationship = commands.add_parser("relationship", help="sharing relationships (channel)")
    rel = relationship.add_subparsers(dest="action", required=True, metavar="ACTION")
    propose = rel.add_parser("propose", help="propose a relationship")
    propose.add_argument("--holder", required=True)
    propose.add_argument("--beneficiary", required=True)
    propose.add_argument(
        "--relation", required=True, type=enum_type(Relation), metavar=_choices(Relation)
    )
    propose.set_defaults(handler=cmd_propose)
    consent = rel.add_parser("consent", help="record one party's consent")
    consent.add_argument("relationship_id")
    consent.add_argument("--party", required=True, type=enum_type(Party), metavar=_choices(Party))
    consent.set_defaults(handler=cmd_consent)
    for name, handler, what in (
        ("allocate", cmd_allocate, "move money from the holder's account into the quota"),
        ("release", cmd_release, "move unused quota back to the holder's account"),
    ):
        move = rel.add_parser(name, help=what)
        move.add_argument("relationship_id")
        move.add_argument("--amount-fen", type=fen_type, required=True)
        _key_option(move)
        move.set_defaults(handler=handler)
    dissolve = rel.add_parser("dissolve", help="dissolve; unused quota returns to the holder")
    dissolve.add_argument("relationship_id")
    dissolve.add_argument("--party", required=True, type=enum_type(Party), metavar=_choices(Party))
    dissolve.set_defaults(handler=cmd_dissolve)
    rel_get = rel.add_parser("get", help="show a relationship")
    rel_get.add_argument("relationship_id")
    rel_get.set_defaults(handler=cmd_relationship_get)
    listing = rel.add_parser("list", help="a holder's or a beneficiary's relationships")
    whose = listing.add_mutually_exclusive_group(required=True)
    whose.add_argument("--holder")
    whose.add_argument("--beneficiary")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    listing.add_argument("--all", action="store_true", help="follow every page")
    listing.set_defaults(handler=cmd_list)

    registry = commands.add_parser("registry", help="registry loads (admin)")
    reg = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    participant = reg.add_parser(
        "participant",
        help="create a participant (or load a CSV: participant_id,scheme,pooling_region)",
    )
    participant.add_argument("participant_id", nargs="?")
    participant.add_argument("--scheme", type=enum_type(Scheme), metavar=_choices(Scheme))
    participant.add_argument("--region", metavar="DIVISION_CODE")
    participant.add_argument("--csv", type=Path)
    participant.set_defaults(handler=cmd_participant)
    get_participant = reg.add_parser("get-participant", help="show a participant")
    get_participant.add_argument("participant_id")
    get_participant.set_defaults(handler=cmd_get_participant)
    credit = reg.add_parser(
        "credit",
        help="credit a personal account (or a CSV: participant_id,amount_fen,idempotency_key)",
    )
    credit.add_argument("participant_id", nargs="?")
    credit.add_argument("--amount-fen", type=fen_type)
    credit.add_argument("--csv", type=Path)
    _key_option(credit)
    credit.set_defaults(handler=cmd_credit)
    merchant = reg.add_parser(
        "merchant",
        help="upsert a merchant (or a CSV: merchant_id,kind,pooling_region,designated,name)",
    )
    merchant.add_argument("merchant_id", nargs="?")
    merchant.add_argument("--kind", type=enum_type(MerchantKind), metavar=_choices(MerchantKind))
    merchant.add_argument("--region", metavar="DIVISION_CODE")
    merchant.add_argument("--name")
    merchant.add_argument("--not-designated", action="store_true")
    merchant.add_argument("--csv", type=Path)
    merchant.set_defaults(handler=cmd_merchant)
    items = reg.add_parser(
        "items",
        help="upsert catalog items (--item ..., or a CSV: item_code,name,category,eligible)",
    )
    items.add_argument(
        "--item",
        action="append",
        type=item_type,
        metavar="CODE:CATEGORY:ELIGIBLE[:NAME]",
        help=f"category {_choices(ItemCategory)}; eligible true|false",
    )
    items.add_argument("--csv", type=Path)
    items.set_defaults(handler=cmd_items)
    event = reg.add_parser("event", help="report an insurance event")
    event.add_argument("participant_id")
    event.add_argument(
        "--type",
        required=True,
        type=enum_type(InsuranceEventType),
        metavar=_choices(InsuranceEventType),
    )
    event.add_argument(
        "--termination-reason",
        type=enum_type(TerminationReason),
        metavar=_choices(TerminationReason),
    )
    event.add_argument("--new-region", metavar="DIVISION_CODE")
    event.add_argument("--new-scheme", type=enum_type(Scheme), metavar=_choices(Scheme))
    event.set_defaults(handler=cmd_event)

    settlement = commands.add_parser("settlement", help="monthly settlement (admin)")
    stl = settlement.add_subparsers(dest="settlement_command", required=True, metavar="COMMAND")
    close = stl.add_parser("close", help="close a month (YYYY-MM, Beijing time); prints its report")
    close.add_argument("month")
    close.set_defaults(handler=cmd_close_month)
    report = stl.add_parser("report", help="a closed month's report")
    report.add_argument("month")
    report.set_defaults(handler=cmd_settlement_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if (args.cert_file is None) != (args.key_file is None):
        parser.error("--cert-file and --key-file go together")
    credentials = None
    if args.ca_file or args.cert_file:
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=args.ca_file.read_bytes() if args.ca_file else None,
                private_key=args.key_file.read_bytes() if args.key_file else None,
                certificate_chain=args.cert_file.read_bytes() if args.cert_file else None,
            )
        except OSError as error:
            parser.error(f"cannot read a TLS file: {error}")
    handler: Callable[[MedWalletClient, argparse.Namespace], object] = args.handler
    try:
        client = MedWalletClient(
            args.address,
            args.token,
            timeout=args.timeout,
            credentials=credentials,
            allow_plaintext=args.plaintext,
        )
    except ValueError as error:
        parser.error(f"{error} (--ca-file for TLS, or --plaintext)")
    with client:
        try:
            result = handler(client, args)
        except UsageError as error:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 2
        except Failure as failure:
            shown: dict[str, Any] = {"error": failure.error.to_dict()}
            if failure.idempotency_key:
                shown["idempotency_key"] = failure.idempotency_key
            emit(shown, sys.stderr)
            return exit_code(failure.error.code)
        except MedWalletError as error:
            emit({"error": error.to_dict()}, sys.stderr)
            return exit_code(error.code)
    emit(result)
    if isinstance(result, dict) and result.get("rejected"):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
