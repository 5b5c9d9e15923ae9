"""What the example flows share: the demo's ids and tokens, options, and plain-words output."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from clients.errors import MedWalletError
from clients.medwallet_client import MedWalletClient
from clients.model import AuthorizeResult, Decision, yuan

# The data `medwallet-authz serve --demo` loads (authz_server/runtime/demo.py).
DEMO_BENEFICIARY = "demo-parent-li"
DEMO_ELIGIBLE_ITEM = "drug-amoxicillin"
DEMO_INELIGIBLE_ITEM = "cosmetic-face-cream"
DEMO_TOKENS = {
    "pharmacy": "demo-pharmacy",
    "hospital": "demo-hospital",
    "collector": "demo-collector",
}

Say = Callable[[str], None]


def parser(description: str, merchant: str) -> argparse.ArgumentParser:
    """Options every example takes: --address, --token (the merchant's), --beneficiary."""
    made = argparse.ArgumentParser(description=description)
    made.add_argument("--address", default="localhost:50051", help="host:port of the service")
    made.add_argument(
        "--token",
        default=DEMO_TOKENS[merchant],
        help=f"the {merchant}'s token (default: the demo's, {DEMO_TOKENS[merchant]})",
    )
    made.add_argument(
        "--beneficiary",
        default=DEMO_BENEFICIARY,
        help=f"who is paying from shared quota (default: {DEMO_BENEFICIARY})",
    )
    made.add_argument("--timeout", type=float, default=5.0, help="deadline per call, seconds")
    return made


def money(amount_fen: int) -> str:
    return f"{yuan(amount_fen)} yuan"


def describe_decision(result: AuthorizeResult) -> str:
    if result.decision is Decision.APPROVED:
        return f"approved in full: {money(result.approved_amount_fen)}"
    if result.decision is Decision.PARTIALLY_APPROVED:
        return f"partly approved: {money(result.approved_amount_fen)}"
    reason = result.decline_reason.name if result.decline_reason else "no reason given"
    return f"declined ({reason})"


def run(
    argv: Sequence[str] | None,
    build: Callable[[], argparse.ArgumentParser],
    flow: Callable[[MedWalletClient, argparse.Namespace, Say], int],
) -> int:
    """Parses the options, connects, runs `flow`, and explains a failed call in words."""
    args = build().parse_args(argv)

    def say(text: str) -> None:
        print(text, flush=True)

    with MedWalletClient(args.address, args.token, timeout=args.timeout) as client:
        try:
            return flow(client, args, say)
        except MedWalletError as error:
            say(f"The service refused a call: {error.code.name}, reason {error.reason}.")
            if error.field:
                say(f"The field at fault: {error.field}.")
            say(f"Its message: {error.message}")
            return 1
