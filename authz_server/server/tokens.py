"""The tokens file: bearer tokens stored as SHA-256 digests, reloaded when it changes on disk.

Format (what `medwallet-authz tokens add` writes; the token itself is printed once, never kept):

    {"tokens": [
      {"id": "tok-3f2a", "sha256": "<64 hex>", "kind": "admin"},
      {"id": "tok-91c0", "sha256": "<64 hex>", "kind": "channel", "channel": "APP"},
      {"id": "tok-77de", "sha256": "<64 hex>", "kind": "merchant", "merchant_id": "M1"}]}

The older format, {"<token>": {"kind": ...}}, is still read (hashed on load, its id the first
8 hex of the digest) so an existing file keeps working; `tokens add` rewrites it hashed.
A token is a random 256-bit string, so an unsalted SHA-256 is enough: there is nothing to
guess a dictionary from, and the digest is a lookup key (one hash per call, no slow KDF).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authz_server.domain.types import Channel

log = logging.getLogger(__name__)

# How often a call may look at the file's modification stamp (one stat a second at most).
RELOAD_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class TokenEntry:
    token_id: str
    kind: str
    channel: str | None = None
    merchant_id: str | None = None

    def as_json(self, digest: str) -> dict[str, str]:
        entry = {"id": self.token_id, "sha256": digest, "kind": self.kind}
        if self.channel is not None:
            entry["channel"] = self.channel
        if self.merchant_id is not None:
            entry["merchant_id"] = self.merchant_id
        return entry


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _entry(token_id: str, fields: dict[str, Any]) -> TokenEntry:
    kind = str(fields["kind"])
    if kind not in ("admin", "channel", "merchant"):
        raise ValueError(f"token {token_id}: unknown kind {kind!r}")
    channel = str(fields["channel"]) if kind == "channel" else None
    if channel is not None:
        Channel(channel)  # raises on an unknown channel
    merchant_id = str(fields["merchant_id"]) if kind == "merchant" else None
    return TokenEntry(token_id, kind, channel, merchant_id)


def parse(document: dict[str, Any]) -> dict[str, TokenEntry]:
    """digest -> entry, from either format."""
    if isinstance(document.get("tokens"), list):
        return {
            str(item["sha256"]).lower(): _entry(str(item["id"]), item)
            for item in document["tokens"]
        }
    entries = {}
    for token, fields in document.items():
        hashed = digest(token)
        entries[hashed] = _entry(f"legacy-{hashed[:8]}", fields)
    return entries


def read(path: Path) -> dict[str, TokenEntry]:
    return parse(json.loads(path.read_text()))


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class TokenStore:
    """The tokens of a file, looked up by digest; the file is read again when its modification
    stamp changes (checked at most once a second, on a call). A file that does not parse keeps
    the tokens read before (an ERROR is logged), so a half-written edit never locks all out."""

    def __init__(self, path: Path | None, entries: dict[str, TokenEntry]) -> None:
        self.path = path
        self.entries = entries
        self.checked = time.monotonic()
        self.stamp = _stamp(path) if path is not None else (0, 0, 0)

    @classmethod
    def from_file(cls, path: Path) -> TokenStore:
        return cls(path, read(path))

    def lookup(self, token: str) -> TokenEntry | None:
        if self.path is not None and time.monotonic() - self.checked >= RELOAD_CHECK_SECONDS:
            self.reload_if_changed()
        return self.entries.get(digest(token))

    def reload_if_changed(self) -> bool:
        assert self.path is not None
        self.checked = time.monotonic()
        try:
            stamp = _stamp(self.path)
            if stamp == self.stamp:
                return False
            entries = read(self.path)
        except Exception as error:
            log.error("tokens file not reloaded, keeping the tokens read before: %r", error)
            return False
        self.entries, self.stamp = entries, stamp
        log.info("tokens file reloaded: %d tokens", len(entries))
        return True


def write(path: Path, entries: dict[str, TokenEntry]) -> None:
    """Writes the hashed format atomically (a reader sees the old file or the new one)."""
    document = {"tokens": [entry.as_json(hashed) for hashed, entry in entries.items()]}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[None]:
    """One read-modify-write of the file at a time (`tokens add`/`revoke` run side by side, by
    hand or by a script): without it one's write put back what the other had just removed, a
    revoked token served again, or dropped a token the other had just added. An exclusive
    flock on a lock file beside it, held until the new file is in place."""
    lock = path.with_name(f".{path.name}.lock")
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # lets the lock go


def add(path: Path, kind: str, channel: str | None, merchant_id: str | None) -> tuple[str, str]:
    """Adds a new random token; returns (token id, token). The token is not stored."""
    with _editing(path):
        entries = read(path) if path.exists() else {}
        token = secrets.token_urlsafe(32)
        token_id = f"tok-{secrets.token_hex(4)}"
        fields = {"kind": kind, "channel": channel, "merchant_id": merchant_id}
        entries[digest(token)] = _entry(token_id, fields)
        write(path, entries)
    return token_id, token


def revoke(path: Path, token_id: str) -> bool:
    """Removes the token with this id (running servers drop it within a second)."""
    with _editing(path):
        entries = read(path)
        kept = {hashed: entry for hashed, entry in entries.items() if entry.token_id != token_id}
        if len(kept) == len(entries):
            return False
        write(path, kept)
    return True


def hashed_file(tokens: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The hashed document for {token: principal fields} (demo and test token files)."""
    return {
        "tokens": [
            _entry(f"tok-{digest(token)[:8]}", fields).as_json(digest(token))
            for token, fields in tokens.items()
        ]
    }
