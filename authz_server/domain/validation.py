"""Field validation: each check names the field and says why, before anything is written."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from enum import StrEnum
from typing import TypeVar

from authz_server.domain.errors import InvalidArgument

# Upper bound of one money movement: 100 million yuan. Far above any real bill or allocation,
# low enough that sums of many stay far from int64 overflow.
MAX_AMOUNT_FEN = 10_000_000_000
MAX_ID_LENGTH = 64
MAX_NAME_LENGTH = 200
_ID_PATTERN = re.compile(r"[A-Za-z0-9_\-]+")
_CONTROL_PATTERN = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A 6-digit administrative division code (GB/T 2260) whose first two digits are a province:
# 11-15, 21-23, 31-37, 41-46, 50-54, 61-65, 71 (Taiwan), 81-82 (Hong Kong, Macao).
_REGION_PATTERN = re.compile(r"(1[1-5]|2[1-3]|3[1-7]|4[1-6]|5[0-4]|6[1-5]|71|8[12])[0-9]{4}")

E = TypeVar("E", bound=StrEnum)


def identifier(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_ID_LENGTH} characters")
    if not _ID_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "may contain only A-Z, a-z, 0-9, '-' and '_'")
    return value


def optional_identifier(field: str, value: str) -> str | None:
    return identifier(field, value) if value else None


def idempotency_key(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_ID_LENGTH} characters")
    if not value.isprintable() or value != value.strip():
        raise InvalidArgument(field, "must be printable with no leading or trailing space")
    return value


def name(field: str, value: str) -> str:
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_NAME_LENGTH} characters")
    # Control characters (NUL above all: PostgreSQL text cannot hold it) are never part of a name.
    if _CONTROL_PATTERN.search(value):
        raise InvalidArgument(field, "must not contain control characters")
    return value


def pooling_region(field: str, value: str) -> str:
    if not _REGION_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "must be a 6-digit administrative division code like 110100")
    return value


def page_token(field: str, value: str) -> str:
    """A page token is opaque to callers, but only one this service issued is accepted: the
    canonical URL-safe base64 of an identifier (the last id of the previous page)."""
    if not value:
        return value
    try:
        raw = base64.urlsafe_b64decode(value.encode("ascii"))
        decoded = raw.decode("ascii")
    except (ValueError, UnicodeError):  # binascii.Error is a ValueError
        raise InvalidArgument(field, "is not a token this service issued") from None
    canonical = base64.urlsafe_b64encode(raw).decode("ascii") == value
    if not canonical or len(decoded) > MAX_ID_LENGTH or not _ID_PATTERN.fullmatch(decoded):
        raise InvalidArgument(field, "is not a token this service issued")
    return value


def amount_fen(field: str, value: int, *, maximum: int = MAX_AMOUNT_FEN) -> int:
    if value <= 0:
        raise InvalidArgument(field, "must be a positive number of fen")
    if value > maximum:
        raise InvalidArgument(field, f"must be at most {maximum} fen")
    return value


def choice(field: str, value: str | None, enum: type[E], allowed: Iterable[E] | None = None) -> E:
    """A proto enum arrives as its name minus prefix; None or an unknown name is refused."""
    if value is None:
        raise InvalidArgument(field, "must be set")
    try:
        member = enum(value)
    except ValueError:
        raise InvalidArgument(field, f"unknown value {value!r}") from None
    if allowed is not None and member not in set(allowed):
        raise InvalidArgument(field, f"{member.value} is not allowed here")
    return member
