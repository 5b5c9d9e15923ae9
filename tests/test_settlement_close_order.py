"""A month older than the last closed one was accepted for closing after it (audit finding).

After the first close "every month in turn" (README "Monthly settlement"): the close only
refused a month *after* the next one due (`earliest_open < month`), never one *before* the last
closed month. Closing December 2024 after January 2025 (an operator's slip of the year, or
"let's close the quiet month before we started too") wrote an empty December, and February's
prepaid window then counted three closed months instead of two: the fund was averaged over
300 instead of 200 and came out a third too small (README's worked example: 12,000 fen instead
of 18,000 for Beijing's March fund)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from authz_server.generated.medwallet.v1 import settlement_pb2
from tests import factories
from tests.harness import ADMIN
from tests.test_settlement_races import World


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    built = World(tmp_path)
    yield built
    built.close()


def close(world: World, month: str) -> settlement_pb2.SettlementReport:
    request = settlement_pb2.CloseMonthRequest(month=month)
    return world.settlement.CloseMonth(request, metadata=ADMIN).report


def test_a_month_before_the_last_closed_one_cannot_be_closed_after_it(
    world: World,
) -> None:
    world.at(2025, 1, 31, 21)
    world.capture()  # 1,000 fen from Beijing (110100) spent in Shenzhen (440300)
    world.at(2025, 2, 5, 12)
    january = close(world, "2025-01")
    assert {f.pooling_region: f.next_month_fen for f in january.prepaid_funds} == {
        "110100": 1_200,  # ⌈1,000 × 120 / 100⌉
    }
    refused: grpc.RpcError | None = None
    try:
        close(world, "2024-12")
    except grpc.RpcError as error:
        refused = error
    world.at(2025, 3, 5, 12)
    february = close(world, "2025-02")
    funds = {f.pooling_region: f.next_month_fen for f in february.prepaid_funds}
    # Two closed months in February's window (January, February): ⌈(1,000 + 0) × 120 / 200⌉.
    assert funds["110100"] == 600, funds
    assert refused is not None, "December 2024 was closed after January 2025"
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert factories.error_info(refused).reason == "MONTH_BEFORE_FIRST_CLOSE"


def test_the_month_after_the_last_closed_one_is_still_closable(
    world: World,
) -> None:
    world.at(2025, 1, 31, 21)
    world.capture()
    world.at(2025, 3, 5, 12)
    close(world, "2025-01")
    assert close(world, "2025-01").captured_fen == 1_000  # closing again: the stored report
    assert close(world, "2025-02").captured_fen == 0
