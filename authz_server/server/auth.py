"""Principals: from a client certificate (mutual TLS) or a bearer token, never from the request
body. The tokens file holds SHA-256 digests (server/tokens.py)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import grpc

from authz_server.domain.types import Channel
from authz_server.server.tokens import TokenStore


class PrincipalKind(StrEnum):
    ADMIN = "admin"
    CHANNEL = "channel"
    MERCHANT = "merchant"


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    channel: Channel | None = None
    merchant_id: str | None = None
    # What proved it, for the audit trail: "token:<token id>" or "cert:<SHA-256 fingerprint>".
    credential: str = field(default="", compare=False)


# The principal the current call proved (None before, or when it proved none): the audit
# wrapper reads it after the handler (server/audit.py).
authenticated: ContextVar[Principal | None] = ContextVar("authenticated", default=None)
# The principal the current call resolved: the limiter asks first (server/limits.py), then the
# handler (require), and the second gets the first answer instead of reading the metadata and
# digesting the token again. So a call is authenticated once, at its start, as a check at
# the start of a call is: a token revoked while the call waits on the limiter's Redis check
# is refused from the next call on (the tokens file is read again at most once a second anyway).
# Matched by the Authenticator and by the call's context object, by id: the context is alive
# for as long as its call runs, so no other live object has its id, and no reference to it
# (nor to its metadata, the bearer token among them) is kept in the tasks a call starts, which
# inherit this variable. A call's task starts without a value: grpc.aio copies it from its
# server task, where no principal is ever resolved.
_resolved: ContextVar[tuple[object, int, Principal] | None] = ContextVar(
    "resolved_principal", default=None
)


class Unauthenticated(Exception):
    pass


class PermissionDenied(Exception):
    pass


class ClientIdentity(Protocol):
    """What a call's client certificate proves (server/tls.py: gRPC's own TLS; server/
    tls_front.py: the service's TLS front)."""

    # True: mutual TLS, every caller presents a certificate and merchant tokens are refused.
    mutual: bool

    def merchant(self, context: grpc.aio.ServicerContext[object, object]) -> Principal | None:
        """The merchant the caller's certificate names; None: it names none (the caller adds
        a token). Raises Unauthenticated when the caller has no acceptable certificate."""
        ...


class Authenticator:
    """Who is calling. With mutual TLS (`client_identity` set), a merchant is the one its client
    certificate names (a URI SAN or the subject CN `medwallet:merchant:<id>`), and a merchant
    token is refused; admin and channels present a token over that connection. Without mutual
    TLS every principal presents a token. Tokens are looked up by SHA-256 (server/tokens.py)."""

    def __init__(self, tokens: TokenStore, client_identity: ClientIdentity | None = None) -> None:
        self.tokens = tokens
        self.client_identity = client_identity

    @classmethod
    def from_file(cls, path: Path, client_identity: ClientIdentity | None = None) -> Authenticator:
        return cls(TokenStore.from_file(path), client_identity)

    def principal(self, context: grpc.aio.ServicerContext[object, object]) -> Principal:
        """The call's principal (resolved once per call; a refusal is raised every time)."""
        resolved = _resolved.get()
        if resolved is not None and resolved[0] is self and resolved[1] == id(context):
            principal = resolved[2]
        else:
            principal = self._resolve(context)
            _resolved.set((self, id(context), principal))
        # Set on every answer, not only the first: the audit wrapper clears it before the
        # handler runs and records the principal the handler was given (server/audit.py).
        authenticated.set(principal)
        return principal

    def _resolve(self, context: grpc.aio.ServicerContext[object, object]) -> Principal:
        certified = (
            self.client_identity.merchant(context) if self.client_identity is not None else None
        )
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
        if certified is not None:
            if header:
                raise Unauthenticated("a merchant certificate needs no token: send none")
            return certified
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        entry = self.tokens.lookup(token.strip())
        if entry is None:
            raise Unauthenticated("unknown token")
        kind = PrincipalKind(entry.kind)
        if (
            kind is PrincipalKind.MERCHANT
            and self.client_identity is not None
            and self.client_identity.mutual
        ):
            raise Unauthenticated("with mutual TLS a merchant is identified by its certificate")
        return Principal(
            kind=kind,
            channel=Channel(entry.channel) if entry.channel is not None else None,
            merchant_id=entry.merchant_id,
            credential=f"token:{entry.token_id}",
        )

    def require(
        self, context: grpc.aio.ServicerContext[object, object], kind: PrincipalKind
    ) -> Principal:
        principal = self.principal(context)
        if principal.kind is not kind:
            raise PermissionDenied(f"this call needs a {kind.value} token")
        return principal
