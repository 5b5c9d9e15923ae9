"""A hospital discharge: hold the estimated out-of-pocket part, capture the final bill (less than
the hold; the rest returns to the quota at once), and later refund a corrected charge.

    python -m clients.examples.hospital_discharge --address localhost:50051
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from clients.examples._common import Say, describe_decision, money, parser, run
from clients.medwallet_client import MedWalletClient
from clients.model import Purpose


def build_parser() -> argparse.ArgumentParser:
    made = parser("A hospital discharge paid from shared quota.", "hospital")
    made.add_argument(
        "--estimate-fen", type=int, default=60_000, help="the out-of-pocket estimate to hold"
    )
    made.add_argument("--bill-fen", type=int, default=45_000, help="the final out-of-pocket bill")
    made.add_argument("--refund-fen", type=int, default=5_000, help="a charge corrected later")
    return made


def discharge(client: MedWalletClient, args: argparse.Namespace, say: Say) -> int:
    say(
        f"Discharging {args.beneficiary}: holding the estimated out-of-pocket part, "
        f"{money(args.estimate_fen)}."
    )
    hold = client.authorize(
        args.beneficiary, Purpose.MEDICAL_OUT_OF_POCKET, amount_fen=args.estimate_fen
    )
    say(f"The quota {describe_decision(hold)}.")
    if not hold.approved:
        say("Nothing is held; the patient pays the bill another way.")
        return 0
    for part in hold.funding:
        say(f"  {money(part.amount_fen)} held on relationship {part.relationship_id}")

    bill = min(args.bill_fen, hold.approved_amount_fen)
    captured = client.capture(hold.authorization_id, bill)
    returned = captured.approved_amount_fen - captured.captured_amount_fen
    say(
        f"The final bill is {money(bill)}: captured {money(captured.captured_amount_fen)}, "
        f"and the other {money(returned)} of the hold went back to the quota at once."
    )

    refund = client.refund(hold.authorization_id, args.refund_fen)
    say(f"Later, a charge of {money(args.refund_fen)} is corrected and refunded:")
    for refunded in refund.parts:
        where = (
            "the holder's personal account (the relationship has ended)"
            if refunded.to_personal_account
            else f"the quota of relationship {refunded.relationship_id}"
        )
        say(f"  {money(refunded.amount_fen)} back to {where}")
    final = refund.authorization
    say(
        f"Authorization {final.authorization_id}: {final.status.name}, captured "
        f"{money(final.captured_amount_fen)}, refunded {money(final.refunded_amount_fen)}; "
        f"the patient paid {money(final.captured_amount_fen - final.refunded_amount_fen)} "
        "from shared quota."
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser, discharge)


if __name__ == "__main__":
    raise SystemExit(main())
