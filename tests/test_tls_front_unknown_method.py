"""Under mutual TLS through the service's TLS front, a connection without a good certificate
is answered UNAUTHENTICATED on every method (README, "Who is calling"): also on a method the
server does not have. Answered UNIMPLEMENTED there, a client without a certificate (or with
another CA's) could tell which methods exist by probing, reflection being refused to it. A
connection with a good certificate still gets UNIMPLEMENTED for a method that does not exist."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import grpc
import pytest

from tests.harness import ADMIN, Harness
from tests.test_tls import Pki, code_of, mutual_tls_harness

pytestmark = pytest.mark.backend_neutral

EXISTING = "/medwallet.v1.RegistryService/GetParticipant"
UNKNOWN = (
    "/medwallet.v1.RegistryService/NoSuchMethod",
    "/medwallet.v1.NoSuchService/Call",
    "/grpc.health.v1.Health/NoSuchMethod",
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki-unknown-method"))


@pytest.fixture(scope="module")
def front(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    running = mutual_tls_harness(pki.directory, tmp_path_factory.mktemp("tls-unknown-method"))
    yield running
    running.close()


@pytest.mark.parametrize("client", ["none", "other_ca", "expired"])
def test_an_unknown_method_on_a_refused_connection_is_unauthenticated(
    pki: Pki, front: Harness, client: str
) -> None:
    certificate = {"none": None, "other_ca": pki.a_from_other_ca, "expired": pki.a_expired}
    with pki.channel(front.port, certificate[client]) as channel:
        # the existing method is refused, as the README says
        existing = channel.unary_unary(EXISTING)
        assert code_of(lambda: existing(b"", metadata=ADMIN, timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        for method in UNKNOWN:
            call = partial(channel.unary_unary(method), b"", metadata=ADMIN, timeout=5)
            assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED, method


def test_an_unknown_method_on_a_good_connection_is_unimplemented(pki: Pki, front: Harness) -> None:
    with pki.channel(front.port, pki.operator) as channel:
        for method in UNKNOWN:
            call = partial(channel.unary_unary(method), b"", metadata=ADMIN, timeout=5)
            assert code_of(call) == grpc.StatusCode.UNIMPLEMENTED, method
            stream = channel.stream_stream(method)
            answers = partial(list, stream(iter([b"", b""]), metadata=ADMIN, timeout=5))
            assert code_of(answers) == grpc.StatusCode.UNIMPLEMENTED, method
        # and the service itself is served
        existing = channel.unary_unary(EXISTING)
        assert code_of(lambda: existing(b"", metadata=ADMIN, timeout=5)) == (
            grpc.StatusCode.INVALID_ARGUMENT  # an empty participant id
        )
