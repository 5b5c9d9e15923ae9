"""Settlement rules of POLICY.md ("Settlement"), without I/O.

Months run from midnight Beijing time (UTC+8, no daylight saving) on the 1st. The prepaid fund
(预付金) for the next month is the average outflow of the last three closed months (the month
being closed included) times a safety factor, rounded up to the fen; the factor is given in
percent so no floating point touches money.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from authz_server.domain.errors import InvalidArgument, PolicyRefusal

BEIJING = timezone(timedelta(hours=8), "Asia/Shanghai")
# ASCII digits only: \d would take any Unicode digit (full-width ２０２６) for one.
MONTH_PATTERN = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
# How many closed months the prepaid fund averages over.
PREPAID_WINDOW_MONTHS = 3


@dataclass(frozen=True, order=True)
class Month:
    year: int
    month: int

    @classmethod
    def parse(cls, field: str, text: str) -> Month:
        match = MONTH_PATTERN.fullmatch(text)
        if not match or not 2000 <= int(match.group(1)) <= 2999:
            raise InvalidArgument(field, "must be a month YYYY-MM between 2000 and 2999")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def containing(cls, moment: datetime) -> Month:
        local = moment.astimezone(BEIJING)
        return cls(local.year, local.month)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    def next(self) -> Month:
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def previous(self) -> Month:
        return Month(self.year - (self.month == 1), (self.month - 2) % 12 + 1)

    @property
    def starts_at(self) -> datetime:
        """The first instant of the month, in UTC."""
        return datetime(self.year, self.month, 1, tzinfo=BEIJING).astimezone(UTC)

    @property
    def ends_at(self) -> datetime:
        """The first instant after the month, in UTC."""
        return self.next().starts_at


# Servers date captures and refunds by their own clocks, the host that closes a month by its
# own: a close waits this long past the month's end, so a server whose clock runs behind the
# closer's by less (NTP keeps hosts within milliseconds) cannot date a write into a month
# already closed, which no month would then settle.
CLOSE_AFTER_MONTH_END_SECONDS = 30


def check_closable(
    month: Month, now: datetime, earliest_open: Month | None, closed_before: bool = False
) -> None:
    """A month closes once it has ended (CLOSE_AFTER_MONTH_END_SECONDS ago), and only after
    every earlier month with traffic. `closed_before`: a month is closed already; from then on
    months close in turn, so one still open before `earliest_open` (the month after the last
    closed one) lies before the first close and never closes: closed late, it would count in
    the prepaid window of the months after it as a closed month it never was in turn (their
    funds averaged over one month too many)."""
    if now < month.ends_at + timedelta(seconds=CLOSE_AFTER_MONTH_END_SECONDS):
        raise PolicyRefusal(
            "MONTH_NOT_ENDED",
            f"{month} has not ended in Beijing time (a close waits "
            f"{CLOSE_AFTER_MONTH_END_SECONDS} s past its end, for every server's clock)",
        )
    if closed_before and earliest_open is not None and month < earliest_open:
        raise PolicyRefusal(
            "MONTH_BEFORE_FIRST_CLOSE",
            f"{month} is before the first closed month: months close in turn from it",
        )
    if earliest_open is not None and earliest_open < month:
        raise PolicyRefusal("EARLIER_MONTH_OPEN", f"{earliest_open} must be closed first")


def prepaid_fund(outflows_fen: Sequence[int], safety_percent: int) -> int:
    """The next month's prepaid fund from the outflows of up to the last three closed months.
    Negative outflows (more refunded than spent) count as zero: a fund is never negative."""
    window = [max(0, outflow) for outflow in outflows_fen[-PREPAID_WINDOW_MONTHS:]]
    if not window:
        return 0
    numerator = sum(window) * safety_percent
    denominator = len(window) * 100
    return -(-numerator // denominator)  # ceiling division in integers
