"""A pharmacy checkout: a basket mixing an eligible drug and an ineligible face cream.

The till asks for the whole basket with allow_partial: the drug is paid from the family's shared
quota, the cream is declined ITEM_NOT_ELIGIBLE (the customer pays it another way), the decision
is PARTIALLY_APPROVED, and the till captures what was approved.

    python -m clients.examples.pharmacy_checkout --address localhost:50051
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from clients.examples._common import (
    DEMO_ELIGIBLE_ITEM,
    DEMO_INELIGIBLE_ITEM,
    Say,
    describe_decision,
    money,
    parser,
    run,
)
from clients.medwallet_client import MedWalletClient
from clients.model import AuthorizationLine, Purpose


def build_parser() -> argparse.ArgumentParser:
    made = parser("A pharmacy checkout paid partly from shared quota.", "pharmacy")
    made.add_argument("--eligible-item", default=DEMO_ELIGIBLE_ITEM, help="an eligible drug")
    made.add_argument("--ineligible-item", default=DEMO_INELIGIBLE_ITEM, help="an ineligible item")
    made.add_argument("--drug-unit-fen", type=int, default=2_350, help="price of one drug box")
    made.add_argument("--drug-quantity", type=int, default=2)
    made.add_argument("--ineligible-fen", type=int, default=8_800, help="price of the other item")
    return made


def checkout(client: MedWalletClient, args: argparse.Namespace, say: Say) -> int:
    basket = [
        AuthorizationLine(
            args.eligible_item, args.drug_quantity, args.drug_unit_fen * args.drug_quantity
        ),
        AuthorizationLine(args.ineligible_item, 1, args.ineligible_fen),
    ]
    total = sum(line.amount_fen for line in basket)
    say(f"Checkout for {args.beneficiary}: {len(basket)} lines, {money(total)} in all.")
    for line in basket:
        say(f"  {line.quantity} x {line.item_code}: {money(line.amount_fen)}")

    payment = client.prepare_authorize(
        args.beneficiary, Purpose.PHARMACY, lines=basket, allow_partial=True
    )
    say(f"Asking the shared quota to pay (idempotency key {payment.idempotency_key}).")
    result = payment.run()
    say(f"The quota {describe_decision(result)} of {money(total)}.")
    for line_result in result.line_results:
        if line_result.approved:
            say(f"  {line_result.item_code}: paid, {money(line_result.approved_amount_fen)}")
        else:
            reason = line_result.decline_reason.name if line_result.decline_reason else "unknown"
            say(f"  {line_result.item_code}: not paid from the quota ({reason})")
    if not result.approved:
        say(f"Nothing is held; the customer pays all {money(total)} another way.")
        return 0
    say(f"The customer pays the other {money(total - result.approved_amount_fen)} another way.")

    captured = client.capture(result.authorization_id)
    say(
        f"Captured {money(captured.captured_amount_fen)} on authorization "
        f"{captured.authorization_id}: {captured.status.name}."
    )
    say(f"Left in the family's quota for {args.beneficiary}: {money(result.remaining_quota_fen)}.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser, checkout)


if __name__ == "__main__":
    raise SystemExit(main())
