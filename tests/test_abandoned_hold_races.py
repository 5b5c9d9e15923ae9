"""The release of an abandoned hold (runtime/release_abandoned_holds.py) racing the till's retry
of the same request with its key, which replays the hold and journals it: SQL's unique
(merchant, idempotency key) decides, whichever commits first. Afterwards either SQL holds the
hold's own decision, Redis still holds its money and the retry was answered APPROVED; or SQL
holds the DECLINED HOLD_ABANDONED row, the money is back (once) and the retry was told so.
Never an approval of money released, nor money held under a decline."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.runtime.release_abandoned_holds import release_abandoned_holds
from authz_server.server.authorization_handler import authorize_response
from authz_server.storage.redis import keys
from authz_server.storage.redis.unconfirmed_holds import UnconfirmedHolds
from tests.harness import Harness
from tests.held_proxy import HeldProxy
from tests.test_abandoned_holds import (
    HOLD_ABANDONED,
    G,
    behind_a_proxy,
    delivered_late,
    key_row,
)
from tests.test_authorization_recovery import hot_figures
from tests.test_authorization_rules import (
    APPROVED,
    DECLINED,
    HOSPITAL,
    MEDICAL,
    Family,
    authorize_request,
    family,
)
from tests.test_live_reconcile import redis_agrees_with_sql
from tests.test_redis_loss import served_stubs

QUOTA_FEN, HELD_FEN = 20_000, 6_000
RACES = 24


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, HeldProxy]]:
    """Its rolling reconcile off: the test runs the release itself, when it wants it."""
    yield from behind_a_proxy(tmp_path_factory.mktemp("abandoned-hold-races"))


@pytest.fixture(scope="module")
def stubs(proxied: tuple[Harness, HeldProxy]) -> Iterator[Any]:
    yield from served_stubs(proxied[0])


def late_clock() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=G + 1)


async def release_on_quota(
    harness: Harness, relationship_id: str, holds: UnconfirmedHolds | None = None
) -> int:
    """The release step over the one quota (a page whose range holds only it)."""
    app = harness.app
    return await release_abandoned_holds(
        app.database,
        holds or UnconfirmedHolds(app.pipelined_redis),
        relationship_id[:-1],
        relationship_id,
        G,
        authorize_response,
        late_clock,
    )


def abandoned_holds(
    harness: Harness, proxy: HeldProxy, stubs: Any, count: int
) -> list[tuple[Family, pb.AuthorizeRequest, str]]:
    """`count` families, each with a hold of HELD_FEN whose Authorize never journaled it:
    (family, its request, the hold's authorization id)."""
    registry, relationships, authorizations, _ = stubs
    families = [family(registry, relationships, QUOTA_FEN) for _ in range(count)]
    requests = [authorize_request(fam.beneficiary_id, MEDICAL, HELD_FEN) for fam in families]
    held = delivered_late(harness, proxy, authorizations, requests)
    return list(zip(families, requests, held, strict=True))


def retried(authorizations: Any, request: pb.AuthorizeRequest) -> pb.AuthorizeResponse:
    answer: pb.AuthorizeResponse = authorizations.Authorize(request, metadata=HOSPITAL, timeout=10)
    return answer


def one_or_the_other(
    harness: Harness,
    fam: Family,
    request: pb.AuthorizeRequest,
    held: str,
    answer: pb.AuthorizeResponse,
    released: int,
) -> str:
    """Checks that the race ended one of the two allowed ways; returns which."""
    (relationship_id,) = fam.relationship_ids
    row = key_row(harness, request.idempotency_key)
    assert row is not None
    figures = hot_figures(harness, fam.beneficiary_id, relationship_id)
    if answer.decision == APPROVED:
        assert (answer.authorization_id, row.authorization_id, row.decision) == (
            held, held, "APPROVED",
        )  # fmt: skip
        assert figures == (QUOTA_FEN - HELD_FEN, HELD_FEN)
        assert released == 0
        outcome = "kept"
    else:
        assert (answer.decision, answer.decline_reason) == (DECLINED, HOLD_ABANDONED), answer
        assert answer.authorization_id == row.authorization_id != held
        assert (row.decision, row.decline_reason, row.approved_fen) == (
            "DECLINED", "HOLD_ABANDONED", 0,
        )  # fmt: skip
        assert figures == (QUOTA_FEN, 0)  # released, once
        # by the release (1), or by the retry meeting SQL's decline first and undoing the hold
        # itself (0: the release's undo then gave nothing back, and does not count it)
        assert released in (0, 1)
        outcome = "released"
    redis_agrees_with_sql(harness, fam.beneficiary_id, relationship_id)
    return outcome


def test_a_retry_racing_the_release_is_approved_with_its_money_or_declined_without(
    proxied: tuple[Harness, HeldProxy], stubs: Any
) -> None:
    harness, proxy = proxied
    authorizations = stubs[2]
    outcomes: list[str] = []
    for number, (fam, request, held) in enumerate(abandoned_holds(harness, proxy, stubs, RACES)):
        (relationship_id,) = fam.relationship_ids
        # The first race lets the release finish first, the second the retry; the rest start
        # them within a few ms of each other, either first.
        offset = {0: 0.5, 1: -0.5}.get(number, random.uniform(-0.02, 0.02))
        answers: list[pb.AuthorizeResponse] = []

        def till(
            request: pb.AuthorizeRequest = request,
            answers: list[pb.AuthorizeResponse] = answers,
            offset: float = offset,
        ) -> None:
            time.sleep(max(0.0, offset))
            answers.append(retried(authorizations, request))

        thread = threading.Thread(target=till)
        thread.start()
        time.sleep(max(0.0, -offset))
        released = harness.run(release_on_quota(harness, relationship_id))
        thread.join(30)
        (answer,) = answers
        outcomes.append(one_or_the_other(harness, fam, request, held, answer, released))
    assert {"kept", "released"} <= set(outcomes), outcomes


def test_a_retry_between_the_declines_commit_and_the_release_is_declined_and_released_once(
    proxied: tuple[Harness, HeldProxy], stubs: Any
) -> None:
    """The release paused after SQL took its decline, before its Redis step: the retry replays
    the hold, its row conflicts, it undoes the hold itself and answers the decline; the
    release's own undo then finds nothing to give back (no money counted back twice)."""
    harness, proxy = proxied
    ((fam, request, held),) = abandoned_holds(harness, proxy, stubs, 1)
    (relationship_id,) = fam.relationship_ids
    holds = UnconfirmedHolds(harness.app.pipelined_redis)
    reached, go_on = threading.Event(), threading.Event()
    real_release = holds.release

    async def paused(hold: Any) -> None:
        reached.set()
        await asyncio.to_thread(go_on.wait, 10)
        await real_release(hold)

    holds.release = paused  # type: ignore[method-assign]
    releasing = asyncio.run_coroutine_threadsafe(
        release_on_quota(harness, relationship_id, holds), harness.loop
    )
    assert reached.wait(10)
    answer = retried(stubs[2], request)
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (QUOTA_FEN, 0)
    go_on.set()
    released = releasing.result(10)
    assert one_or_the_other(harness, fam, request, held, answer, released) == "released"
    assert released == 0  # the retry undid the hold itself; the release found nothing to give


def test_a_release_between_a_retrys_replay_and_its_journal_write_declines_the_retry(
    proxied: tuple[Harness, HeldProxy], stubs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry paused after Redis replayed the hold, before its row is written: the release
    runs whole (SQL takes the decline, the hold goes); the retry's row then conflicts and it
    answers the decline, never the approval Redis replayed to it."""
    harness, proxy = proxied
    ((fam, request, held),) = abandoned_holds(harness, proxy, stubs, 1)
    (relationship_id,) = fam.relationship_ids
    journal = harness.app.authorizations.journal
    real_write = journal.write
    reached, go_on = threading.Event(), threading.Event()

    async def paused(row: dict[str, Any]) -> Any:
        if row["authorization_id"] == held:
            reached.set()
            await asyncio.to_thread(go_on.wait, 10)
        return await real_write(row)

    monkeypatch.setattr(journal, "write", paused)
    answers: list[pb.AuthorizeResponse] = []
    thread = threading.Thread(target=lambda: answers.append(retried(stubs[2], request)))
    thread.start()
    assert reached.wait(10)
    released = harness.run(release_on_quota(harness, relationship_id))
    assert released == 1
    client = harness.admin()
    try:
        assert not client.exists(keys.authorization(held))
    finally:
        client.close()
    go_on.set()
    thread.join(10)
    (answer,) = answers
    assert one_or_the_other(harness, fam, request, held, answer, released) == "released"


def test_a_retry_journaling_the_hold_after_the_release_found_no_row_keeps_it(
    proxied: tuple[Harness, HeldProxy], stubs: Any
) -> None:
    """The release paused after SQL said it has no row of the hold, before its decline goes
    in: the retry replays the hold, journals it and is answered APPROVED. The decline then
    finds the key taken (ON CONFLICT DO NOTHING) and SQL holding the hold's own decision: the
    hold stays, its money held."""
    harness, proxy = proxied
    ((fam, request, held),) = abandoned_holds(harness, proxy, stubs, 1)
    (relationship_id,) = fam.relationship_ids
    holds = UnconfirmedHolds(harness.app.pipelined_redis)
    reached, go_on = threading.Event(), threading.Event()
    real_first_calls = holds.first_calls

    async def paused(found: Any) -> Any:
        reached.set()
        await asyncio.to_thread(go_on.wait, 10)
        return await real_first_calls(found)

    holds.first_calls = paused  # type: ignore[method-assign, assignment]
    releasing = asyncio.run_coroutine_threadsafe(
        release_on_quota(harness, relationship_id, holds), harness.loop
    )
    assert reached.wait(10)
    answer = retried(stubs[2], request)
    assert answer.decision == APPROVED
    go_on.set()
    released = releasing.result(10)
    assert one_or_the_other(harness, fam, request, held, answer, released) == "kept"


def test_a_retry_that_journaled_the_hold_first_keeps_it(
    proxied: tuple[Harness, HeldProxy], stubs: Any
) -> None:
    harness, proxy = proxied
    ((fam, request, held),) = abandoned_holds(harness, proxy, stubs, 1)
    (relationship_id,) = fam.relationship_ids
    answer = retried(stubs[2], request)
    released = harness.run(release_on_quota(harness, relationship_id))
    assert one_or_the_other(harness, fam, request, held, answer, released) == "kept"
    # An ordinary hold from then on: voidable, its money back.
    voided = stubs[2].Void(pb.VoidRequest(authorization_id=held), metadata=HOSPITAL)
    assert voided.authorization.status == pb.AUTHORIZATION_STATUS_VOIDED
    assert hot_figures(harness, fam.beneficiary_id, relationship_id) == (QUOTA_FEN, 0)
