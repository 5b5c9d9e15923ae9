"""One Redis (no cluster) behind an address that moves (a VIP, a proxy, a Sentinel-managed DNS
name): its replica stops taking the replication stream while 16 callers authorize, capture,
void, refund and retry across 50 families; then the primary is killed with -9, the lagging
replica is promoted (REPLICAOF NO ONE) and the address moves to it, every open connection cut.

The promoted Redis holds an older copy of the hot state *of the same generation*: every slot
carries the current mark, so lua/_generation.lua lets scripts through; only its run (a new run
id) tells it apart. Asserted after: no business decline, no approved hold lost, no new decision
for a retried key, every approval journaled, SQL within every quota, no capture or refund
answered OK that SQL does not have, Redis equal to SQL (available + held == unused, held == the
open holds' sum) with no reconcile in between."""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import select

from authz_server.generated.medwallet.v1 import authorization_pb2 as pb
from authz_server.runtime.embedded_redis import redis_server_binary
from authz_server.storage.sql.tables import AuthorizationRow, CaptureRow
from tests.harness import Harness, new_id
from tests.test_authorization_rules import COLLECTOR, RESIDENT_PREMIUM
from tests.test_redis_failback import _free_port, _link_up, _wait
from tests.test_redis_loss import (
    HOSPITAL,
    MEDICAL,
    Tally,
    check,
    make_families,
    patiently,
    retry,
    run_with_fault,
    served_stubs,
)

pytestmark = [pytest.mark.slow, pytest.mark.backend_neutral]


class Proxy:
    """A TCP forwarder to a target that can be moved; moving it cuts every open connection
    (as a VIP that moves, or a client that follows a failover, does)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        chooser = selectors.DefaultSelector()
        chooser.register(a, selectors.EVENT_READ, b)
        chooser.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in chooser.select():
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        raise OSError("closed")
                    key.data.sendall(data)
        except OSError:
            pass
        finally:
            chooser.close()
            for end in (a, b):
                with contextlib.suppress(OSError):
                    end.close()

    def move_to(self, target: int) -> None:
        self.target = target
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for end in (a, b):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    end.close()

    def close(self) -> None:
        self.stopping = True
        self.listener.close()
        self.move_to(self.target)


def start_redis(directory: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--maxmemory-policy",
            "noeviction",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis_lib.Redis(host="127.0.0.1", port=port)
    _wait(lambda: client.ping())
    client.close()
    return process


class Pair:
    def __init__(self, root: Path) -> None:
        self.port_a, self.port_b = _free_port(), _free_port()
        self.a = start_redis(root / "a", self.port_a)
        self.b = start_redis(root / "b", self.port_b, "--replicaof", "127.0.0.1", str(self.port_a))
        self.replica = redis_lib.Redis(host="127.0.0.1", port=self.port_b)
        _wait(lambda: _link_up(self.replica), 30)
        self.proxy = Proxy(self.port_a)

    def break_link(self) -> None:
        """B stays a replica but takes no more writes (it logs in with what A refuses)."""
        self.replica.config_set("masteruser", "nobody-here")
        self.replica.config_set("masterauth", "wrong")
        self.replica.client_kill_filter(_type="master")
        _wait(lambda: self.replica.info("replication").get("master_link_status") == "down")

    def fail_over(self) -> None:
        """A killed -9; B (older copy) promoted; the address moves to B."""
        os.kill(self.a.pid, signal.SIGKILL)
        self.a.wait()
        self.replica.execute_command("REPLICAOF", "NO", "ONE")
        self.proxy.move_to(self.port_b)

    def close(self) -> None:
        self.proxy.close()
        for process in (self.a, self.b):
            if process.poll() is None:
                process.kill()
                process.wait()
        self.replica.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    running = Pair(tmp_path_factory.mktemp("replica-promoted"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def lossy(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TEST_REDIS_URL", f"redis://127.0.0.1:{pair.proxy.port}/0")
        harness = Harness(tmp_path_factory.mktemp("replica-promoted-service"))
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def stubs(lossy: Harness) -> Iterator[Any]:
    yield from served_stubs(lossy)


class MoneyTally(Tally):
    """What the callers were told beyond test_redis_loss's Tally: captures and refunds answered
    OK (authorization id -> fen), voids answered OK."""

    def __init__(self) -> None:
        super().__init__()
        self.captured_ok: dict[str, int] = {}
        self.refunded_ok: dict[str, int] = {}
        self.voided_ok: set[str] = set()
        # one-step premiums answered approved: key -> (request, authorization id)
        premiums: dict[str, tuple[pb.AuthorizeRequest, str]] = {}
        self.premiums = premiums


def money_caller(
    number: int,
    stubs: Any,
    families: list[tuple[str, str]],
    tally: MoneyTally,
    stop: threading.Event,
) -> None:
    _, relationships, authorizations, _ = stubs
    chance = random.Random(1000 + number)
    while not stop.is_set():
        beneficiary, relationship_id = chance.choice(families)
        try:
            if tally.answered and chance.random() < 0.2:
                retry(chance, relationships, authorizations, tally, relationship_id)
                continue
            if chance.random() < 0.15:
                premium(chance, authorizations, beneficiary, tally)
                continue
            request = pb.AuthorizeRequest(
                idempotency_key=new_id("promo"),
                beneficiary_id=beneficiary,
                purpose=MEDICAL,  # type: ignore[arg-type]
                amount_fen=chance.randrange(100, 5_000),
            )
            answer = patiently(
                lambda request=request: authorizations.Authorize(
                    request, metadata=HOSPITAL, timeout=5
                ),
                tally,
                "authorize",
            )
            if answer.decision == pb.DECISION_DECLINED:
                with tally.lock:
                    tally.declines.append(pb.DeclineReason.Name(answer.decline_reason))
                continue
            authorization_id = answer.authorization_id
            with tally.lock:
                tally.approved += 1
                tally.answered[request.idempotency_key] = (request, authorization_id)
            roll = chance.random()
            if roll < 0.3:
                with tally.lock:
                    tally.pending.append(authorization_id)
                continue
            if roll < 0.5:
                void_request = pb.VoidRequest(authorization_id=authorization_id)
                patiently(
                    lambda void_request=void_request: authorizations.Void(
                        void_request, metadata=HOSPITAL, timeout=5
                    ),
                    tally,
                    "void",
                )
                with tally.lock:
                    tally.voided_ok.add(authorization_id)
                continue
            amount = chance.choice([0, max(1, answer.approved_amount_fen // 2)])
            capture_request = pb.CaptureRequest(
                authorization_id=authorization_id,
                amount_fen=amount,
                idempotency_key=new_id("cap"),
            )
            captured = patiently(
                lambda capture_request=capture_request: authorizations.Capture(
                    capture_request, metadata=HOSPITAL, timeout=5
                ),
                tally,
                "capture",
            ).authorization
            with tally.lock:
                tally.captured += 1
                tally.captured_ok[authorization_id] = captured.captured_amount_fen
            if chance.random() < 0.4:
                refund_request = pb.RefundRequest(
                    authorization_id=authorization_id,
                    amount_fen=max(1, captured.captured_amount_fen // 3),
                    idempotency_key=new_id("ref"),
                )
                patiently(
                    lambda refund_request=refund_request: authorizations.Refund(
                        refund_request, metadata=HOSPITAL, timeout=5
                    ),
                    tally,
                    "refund",
                )
                with tally.lock:
                    tally.refunded_ok[authorization_id] = refund_request.amount_fen
        except Exception as error:  # every surprise is counted and reported
            with tally.lock:
                tally.errors.append(repr(error))


def premium(
    chance: random.Random, authorizations: Any, beneficiary: str, tally: MoneyTally
) -> None:
    """A one-step resident premium (captured at once), or a retry of one answered before."""
    if tally.premiums and chance.random() < 0.3:
        with tally.lock:
            key = chance.choice(list(tally.premiums))
            request, first_id = tally.premiums[key]
    else:
        request = pb.AuthorizeRequest(
            idempotency_key=new_id("prem"),
            beneficiary_id=beneficiary,
            purpose=RESIDENT_PREMIUM,  # type: ignore[arg-type]
            amount_fen=chance.randrange(100, 5_000),
        )
        first_id = ""
    answer = patiently(
        lambda: authorizations.Authorize(request, metadata=COLLECTOR, timeout=5),
        tally,
        "premium",
    )
    with tally.lock:
        if first_id:
            tally.retries += 1
            if answer.authorization_id != first_id:
                tally.new_decisions_for_retries.append(request.idempotency_key)
            return
        if answer.decision == pb.DECISION_DECLINED:
            tally.declines.append(pb.DeclineReason.Name(answer.decline_reason))
            return
        tally.premiums[request.idempotency_key] = (request, answer.authorization_id)
        tally.captured_ok[answer.authorization_id] = answer.approved_amount_fen


def run_money_load(lossy: Harness, stubs: Any, families: Any, fault: Any) -> Any:
    import tests.test_redis_loss as loss

    original_tally, original_caller = loss.Tally, loss.caller
    loss.Tally, loss.caller = MoneyTally, money_caller  # type: ignore[misc,assignment]
    try:
        return run_with_fault(lossy, stubs, families, fault)
    finally:
        loss.Tally, loss.caller = original_tally, original_caller  # type: ignore[misc]


def assert_told_matches_sql(lossy: Harness, tally: MoneyTally) -> None:
    """Every approval journaled; every capture and refund answered OK is in SQL as answered;
    every void answered OK is not captured."""
    approved = {first for _, first in tally.answered.values()}

    def read(session: Any) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
        rows = session.execute(
            select(AuthorizationRow.authorization_id, AuthorizationRow.decision)
        ).all()
        caps = session.execute(
            select(CaptureRow.authorization_id, CaptureRow.amount_fen, CaptureRow.refunded_fen)
        ).all()
        return ({r[0]: r[1] for r in rows}, {c[0]: (c[1], c[2]) for c in caps})

    journal, captures = lossy.app.database.transaction(read)
    missing = sorted(approved - set(journal))
    assert not missing, f"approvals not journaled: {missing[:5]}"
    wrong_captures = [
        (aid, fen, captures.get(aid))
        for aid, fen in tally.captured_ok.items()
        if aid not in captures or captures[aid][0] != fen
    ]
    assert not wrong_captures, wrong_captures[:5]
    wrong_refunds = [
        (aid, fen, captures.get(aid))
        for aid, fen in tally.refunded_ok.items()
        if aid not in captures or captures[aid][1] != fen
    ]
    assert not wrong_refunds, wrong_refunds[:5]
    voided_but_captured = sorted(tally.voided_ok & set(captures))
    assert not voided_but_captured, voided_but_captured[:5]


def test_a_lagging_replica_promoted_under_load_loses_nothing(
    pair: Pair, lossy: Harness, stubs: Any
) -> None:
    families = make_families(stubs)
    rebuilt_before = lossy.app.guardian.last_rebuild

    def fault() -> None:
        pair.break_link()  # from here on the replica misses every write
        time.sleep(1.0)
        pair.fail_over()

    tally, before, recovery = run_money_load(lossy, stubs, families, fault)
    check(lossy, stubs, "lagging replica promoted", tally, before, recovery)
    assert_told_matches_sql(lossy, tally)
    assert tally.unavailable > 0
    assert lossy.app.guardian.last_rebuild is not rebuilt_before
    assert tally.voided_ok and tally.captured_ok and tally.refunded_ok  # the load moved money


def test_the_primary_stalled_past_the_timeout_under_money_load_loses_nothing(
    pair: Pair, lossy: Harness, stubs: Any
) -> None:
    """The primary (B, once promoted) stopped (SIGSTOP) for 3 s under the same load: calls
    time out while their scripts wait in Redis's socket and run once it goes on; retried with
    their keys.
    Nothing rebuilt, nothing lost or paid twice."""
    families = make_families(stubs)
    rebuilt_before = lossy.app.guardian.last_rebuild

    # B once the first test failed over to it, else A.
    primary = pair.b if pair.a.poll() is not None else pair.a

    def stall() -> None:
        os.kill(primary.pid, signal.SIGSTOP)
        threading.Timer(3.0, os.kill, (primary.pid, signal.SIGCONT)).start()

    tally, before, recovery = run_money_load(lossy, stubs, families, stall)
    check(lossy, stubs, "stalled 3 s", tally, before, recovery)
    assert_told_matches_sql(lossy, tally)
    assert tally.unavailable > 0
    assert lossy.app.guardian.last_rebuild is rebuilt_before
