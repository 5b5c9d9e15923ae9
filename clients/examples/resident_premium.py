"""A resident-scheme premium paid from shared quota: in full, or refused when the quota is short
(premiums are never paid in part). Authorized and captured in one step.

    python -m clients.examples.resident_premium --address localhost:50051
    python -m clients.examples.resident_premium --premium-fen 990000   # more than the quota
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from clients.examples._common import Say, money, parser, run
from clients.medwallet_client import MedWalletClient
from clients.model import Decision, DeclineReason, Purpose


def build_parser() -> argparse.ArgumentParser:
    made = parser("A resident premium paid from shared quota.", "collector")
    made.add_argument(
        "--premium-fen", type=int, default=40_000, help="the year's premium (default 400.00)"
    )
    return made


def pay_premium(client: MedWalletClient, args: argparse.Namespace, say: Say) -> int:
    say(
        f"Collecting the resident-scheme premium of {args.beneficiary}: "
        f"{money(args.premium_fen)}, from the family's shared quota."
    )
    result = client.authorize(
        args.beneficiary,
        Purpose.RESIDENT_PREMIUM,
        amount_fen=args.premium_fen,
        capture=True,
    )
    if result.decision is Decision.APPROVED:
        say(
            f"Paid in full: {money(result.approved_amount_fen)} "
            f"(authorization {result.authorization_id}, {result.status.name})."
        )
        say(f"Left in the quota: {money(result.remaining_quota_fen)}.")
        return 0
    if result.decline_reason is DeclineReason.INSUFFICIENT_QUOTA:
        say(
            f"Refused: the quota holds {money(result.remaining_quota_fen)}, less than the "
            f"premium. A premium is paid in full or not at all, so nothing was charged; "
            "the premium must be paid another way."
        )
    else:
        reason = result.decline_reason.name if result.decline_reason else "no reason given"
        say(f"Refused ({reason}); nothing was charged.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser, pay_premium)


if __name__ == "__main__":
    raise SystemExit(main())
