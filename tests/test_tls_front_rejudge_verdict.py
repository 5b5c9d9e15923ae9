"""A verdict judged again after a client CA change (server/tls_front.py Peers.current) is the
new file's verdict whole: the chain's end of validity (`not_after`) too, not the old file's."""

from __future__ import annotations

import datetime
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL
from OpenSSL.crypto import X509

from authz_server.runtime.certificates import CA_KEY_USAGE, Issued, issue, make_ca
from authz_server.server.tls_front import EXPIRED, Peer, Peers

pytestmark = pytest.mark.backend_neutral


def reissued(ca: Issued, hours: float) -> Issued:
    """The same CA (name and key) in a certificate of its own, valid `hours` more."""
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(ca.certificate.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(hours=hours))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(certificate, ca.key)


def trusting(*cas: Issued) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    store = context.get_cert_store()
    assert store is not None
    for ca in cas:
        store.add_cert(X509.from_cryptography(ca.certificate))
    return context


def test_a_verdict_judged_again_takes_the_new_chains_end_of_validity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old file's CA is valid ten years, the new file's (the same CA re-issued) one hour: a
    new handshake two hours on is refused (expired), and so is a call on a connection judged
    again under the new file, whose old verdict would have run ten years."""
    old = make_ca("rotated CA", days=3650)
    new = reissued(old, hours=1)
    leaf = issue(old, "merchant-a", merchant_id="a")
    peers = Peers()
    old_chain = (leaf.certificate, old.certificate)
    peers.take(
        50_000,
        Peer(
            not_after=min(c.not_valid_after_utc for c in old_chain).timestamp(),
            chain=(leaf.certificate,),
        ),
    )
    peers.trust(trusting(new))
    judged = peers.current(50_000)
    assert judged is not None and judged.reason() is None  # the new CA vouches for it now
    later = time.time() + 2 * 3600
    monkeypatch.setattr(time, "time", lambda: later)
    judged = peers.current(50_000)
    assert judged is not None and judged.reason() == EXPIRED
