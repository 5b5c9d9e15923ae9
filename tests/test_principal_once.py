"""A call's principal is resolved once (server/auth.py): the limiter and the handler both ask,
and the second gets the first answer. Only the same call's context gets it: another call, or a
task a call started, resolves its own; a refusal is raised every time."""

from __future__ import annotations

import asyncio

import pytest

from authz_server.server.auth import (
    Authenticator,
    PrincipalKind,
    Unauthenticated,
    authenticated,
)
from authz_server.server.tokens import TokenEntry, TokenStore, digest


class Context:
    """What the authenticator reads of a grpc.aio call's context: its metadata."""

    def __init__(self, token: str | None) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.reads = 0

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        self.reads += 1
        return self.metadata


def authenticator() -> Authenticator:
    return Authenticator(
        TokenStore(
            None,
            {
                digest("till-a"): TokenEntry("a", "merchant", merchant_id="merchant-a"),
                digest("till-b"): TokenEntry("b", "merchant", merchant_id="merchant-b"),
            },
        )
    )


def test_the_second_ask_of_one_call_reads_nothing_again() -> None:
    auth = authenticator()

    async def call() -> None:
        context = Context("till-a")
        first = auth.principal(context)  # type: ignore[arg-type]
        authenticated.set(None)  # what the audit wrapper does before the handler runs
        again = auth.require(context, PrincipalKind.MERCHANT)  # type: ignore[arg-type]
        assert again is first and first.merchant_id == "merchant-a"
        assert context.reads == 1
        # the handler's answer is the one the audit trail records
        assert authenticated.get() is first

    asyncio.run(call())


def test_a_task_started_by_a_call_or_another_context_resolves_its_own() -> None:
    auth = authenticator()

    async def call() -> None:
        first = Context("till-a")
        assert auth.principal(first).merchant_id == "merchant-a"  # type: ignore[arg-type]

        async def child() -> tuple[str | None, int]:
            # inherits the call's variables (its answer among them), not its context object
            own = Context("till-b")
            return auth.principal(own).merchant_id, own.reads  # type: ignore[arg-type]

        assert await asyncio.get_running_loop().create_task(child()) == ("merchant-b", 1)
        # the child's answer stayed in the child: the call still has its own, unread again
        assert auth.principal(first).merchant_id == "merchant-a"  # type: ignore[arg-type]
        assert first.reads == 1
        # another context in the same task: resolved anew, and then the first one is too
        other = Context("till-b")
        assert auth.principal(other).merchant_id == "merchant-b"  # type: ignore[arg-type]
        assert auth.principal(first).merchant_id == "merchant-a"  # type: ignore[arg-type]
        assert (other.reads, first.reads) == (1, 2)

    asyncio.run(call())


def test_a_refusal_is_not_remembered() -> None:
    auth = authenticator()

    async def call() -> None:
        context = Context("not-a-token")
        for _ in range(2):
            with pytest.raises(Unauthenticated):
                auth.principal(context)  # type: ignore[arg-type]
        assert context.reads == 2

    asyncio.run(call())


def test_another_authenticator_does_not_get_the_first_ones_answer() -> None:
    first, other = authenticator(), Authenticator(TokenStore(None, {}))

    async def call() -> None:
        context = Context("till-a")
        assert first.principal(context).merchant_id == "merchant-a"  # type: ignore[arg-type]
        with pytest.raises(Unauthenticated):  # it knows no token: it must look for itself
            other.principal(context)  # type: ignore[arg-type]

    asyncio.run(call())
