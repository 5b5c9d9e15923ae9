"""A helper's security audit of tokens and TLS, each test failing before its fix:

- `tokens add` and `tokens revoke` run side by side (an operator and a provisioning script) each
  read the file, changed their copy and wrote it back: the last write undid the other's, so a
  token revoked (and reported "revoked") was served again, or a token just handed out was gone;
- the client's plaintext guard looked at the first address of a gRPC address list only:
  `ipv6:[::1]:1,[2001:db8::7]:50051` counted as loopback, and the token went in clear to the
  second address when the first did not answer;
- `make-certs` wrote each private key (the CA's too) with the umask's mode, then chmod 0600:
  readable by any local user in between."""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz_server.server import tokens
from clients import NO_RETRIES, MedWalletClient, UnavailableError, cli
from clients.channel import is_loopback
from tests.test_client_retries_and_keys import Eavesdropper, _non_loopback_address

pytestmark = pytest.mark.backend_neutral

# Processes editing the tokens file at once.
EDITORS = 12


def _revoke_after(barrier: Any, path: str, token_id: str, done: Any) -> None:
    barrier.wait(30)
    done.put((token_id, tokens.revoke(Path(path), token_id)))


def _add_after(barrier: Any, path: str, done: Any) -> None:
    barrier.wait(30)
    token_id, _ = tokens.add(Path(path), "merchant", None, "till-added")
    done.put((token_id, True))


def test_tokens_revoked_side_by_side_all_stay_revoked(tmp_path: Path) -> None:
    """EDITORS `tokens revoke` at once, each of another token, each told "revoked", while as many
    `tokens add` run: every revoked token is out of the file (a server reloading it would serve
    none of them) and every added one is in it."""
    path = tmp_path / "tokens.json"
    revocable = [tokens.add(path, "merchant", None, f"till-{index}")[0] for index in range(EDITORS)]
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2 * EDITORS)
    done = context.Queue()
    processes = [
        context.Process(target=_revoke_after, args=(barrier, str(path), token_id, done))
        for token_id in revocable
    ] + [context.Process(target=_add_after, args=(barrier, str(path), done)) for _ in revocable]
    for process in processes:
        process.start()
    answers = [done.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert all(ok for _, ok in answers)  # every revoke said "revoked"
    added = {token_id for token_id, _ in answers if token_id not in revocable}
    left = {entry.token_id for entry in tokens.read(path).values()}
    assert not left & set(revocable), f"revoked, yet in the file: {sorted(left & set(revocable))}"
    assert left == added, f"added, yet not in the file: {sorted(added - left)}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_address_list_is_loopback_only_when_every_address_is() -> None:
    nobody = _free_port()  # nothing listens there: gRPC goes on to the next address
    assert not is_loopback(f"ipv6:[::1]:{nobody},[2001:db8::7]:50051")
    assert not is_loopback(f"ipv4:127.0.0.1:{nobody},192.0.2.7:50051")
    assert not is_loopback(f"ipv6:[::1]:{nobody},[::ffff:192.0.2.7]:50051")
    with pytest.raises(ValueError, match="plaintext"):
        MedWalletClient(f"ipv6:[::1]:{nobody},[2001:db8::7]:50051", "admin-secret")
    # lists of loopback addresses, and single ones, stay plaintext by default
    assert is_loopback(f"ipv4:127.0.0.1:{nobody},127.0.0.1:50051")
    assert is_loopback("ipv6:[::1]:50051")
    assert is_loopback("localhost:50051")
    assert is_loopback("dns:///localhost:50051")


@pytest.fixture
def eavesdropper() -> Iterator[Eavesdropper]:
    listening = Eavesdropper(_non_loopback_address())
    yield listening
    listening.server.stop(None)


def test_no_token_in_clear_to_the_second_address_of_a_list(
    eavesdropper: Eavesdropper, capsys: pytest.CaptureFixture[str]
) -> None:
    """The list's first address is loopback and answers nothing; its second is this machine's
    network address (IPv4-mapped), where anyone on the path could read the call."""
    host, port = eavesdropper.address.rsplit(":", 1)
    target = f"ipv6:[::1]:{_free_port()},[::ffff:{host}]:{port}"
    with (
        contextlib.suppress(ValueError, UnavailableError),
        MedWalletClient(target, "admin-secret", retry=NO_RETRIES) as client,
    ):
        client.get_participant("someone")
    with contextlib.suppress(SystemExit):
        cli.main(
            ["--address", target, "--token", "cli-secret", "--timeout", "2",
             "registry", "get-participant", "someone"]
        )  # fmt: skip
    seen = eavesdropper.tokens()
    assert "Bearer admin-secret" not in seen
    assert "Bearer cli-secret" not in seen
    assert "plaintext" in capsys.readouterr().err


# Key files make_local_set wrote that the audit hook below watches (empty: it watches none).
_watched: list[Path] = []
_readable_keys: list[str] = []
_looking: list[bool] = []


def _key_modes(event: str, _arguments: tuple[Any, ...]) -> None:
    """At every audited event (each open, chmod, rename ...): a watched key file readable by
    anyone but its owner is noted. (Looking raises audited events too: not looked into.)"""
    if _looking or not _watched:
        return
    _looking.append(True)
    try:
        for directory in _watched:
            for key in directory.glob("*.key"):
                with contextlib.suppress(OSError):
                    if key.stat().st_mode & 0o077:
                        _readable_keys.append(f"{key.name} at {event}")
    finally:
        _looking.clear()


def test_make_certs_never_leaves_a_key_readable_by_others(tmp_path: Path) -> None:
    """`medwallet-authz make-certs` wrote each key (the CA's included) with the umask's mode,
    then chmod 0600: in between, under the usual umask 022, any local user could read the CA's
    key and make certificates for any merchant. Watched with an audit hook (sys.addaudithook:
    every open, chmod and rename of the process), under umask 022."""
    import os
    import sys

    from authz_server.runtime.certificates import make_local_set

    if _key_modes not in _hooks:
        sys.addaudithook(_key_modes)  # for the process's life: it watches only _watched
        _hooks.append(_key_modes)
    previous = os.umask(0o022)
    _watched.append(tmp_path)
    try:
        make_local_set(tmp_path, ["till-1"])
        make_local_set(tmp_path, ["till-1"])  # over keys already there too
    finally:
        _watched.clear()
        os.umask(previous)
    assert sorted(path.name for path in tmp_path.glob("*.key")) == [
        "ca.key", "client.key", "merchant-till-1.key", "server.key"
    ]  # fmt: skip
    assert not _readable_keys, _readable_keys


_hooks: list[Any] = []
