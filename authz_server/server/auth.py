"""Bearer tokens -> principals. Identity comes from the token, never from the request body.

The tokens file is JSON: {"<token>": {"kind": "admin"} | {"kind": "channel", "channel": "APP"}
| {"kind": "merchant", "merchant_id": "M1"}}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import grpc

from authz_server.domain.types import Channel


class PrincipalKind(StrEnum):
    ADMIN = "admin"
    CHANNEL = "channel"
    MERCHANT = "merchant"


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    channel: Channel | None = None
    merchant_id: str | None = None


class Unauthenticated(Exception):
    pass


class PermissionDenied(Exception):
    pass


def parse_tokens(document: dict[str, dict[str, str]]) -> dict[str, Principal]:
    principals = {}
    for token, entry in document.items():
        kind = PrincipalKind(entry["kind"])
        principals[token] = Principal(
            kind=kind,
            channel=Channel(entry["channel"]) if kind is PrincipalKind.CHANNEL else None,
            merchant_id=entry["merchant_id"] if kind is PrincipalKind.MERCHANT else None,
        )
    return principals


class Authenticator:
    def __init__(self, principals: dict[str, Principal]) -> None:
        self.principals = principals

    @classmethod
    def from_file(cls, path: Path) -> Authenticator:
        return cls(parse_tokens(json.loads(path.read_text())))

    def principal(self, context: grpc.aio.ServicerContext[object, object]) -> Principal:
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        principal = self.principals.get(token.strip())
        if principal is None:
            raise Unauthenticated("unknown token")
        return principal

    def require(
        self, context: grpc.aio.ServicerContext[object, object], kind: PrincipalKind
    ) -> Principal:
        principal = self.principal(context)
        if principal.kind is not kind:
            raise PermissionDenied(f"this call needs a {kind.value} token")
        return principal
