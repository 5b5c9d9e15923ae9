"""The service's own TLS front (MEDWALLET_TLS_CLIENT_CERTIFICATE_CHECK=call).

gRPC Python can only *require* a client certificate: one that is missing, from another CA or
expired fails the handshake, and the client sees UNAVAILABLE (which it retries as transient)
instead of UNAUTHENTICATED. It cannot ask for a certificate and let the application judge it.
So the service terminates TLS itself, in front of its gRPC server:

- the front listens on the public port (SO_REUSEPORT, one per worker, as gRPC did) and does the
  handshake with OpenSSL (pyOpenSSL, memory BIOs inside asyncio protocols; ALPN h2). With a
  client CA it asks for a client certificate and verifies it against that CA, but lets the
  handshake complete whatever the verdict: the first verification error is kept;
- for each connection it opens a plaintext one to the gRPC server's private listener (127.0.0.1,
  a port of its own, per process) and, before forwarding a byte, records what it learnt
  (`Peer`: the merchant the certificate names, or why it is refused) under that connection's
  local port, which gRPC reports as the call's peer (`context.peer()`); the record goes with the
  connection, and its port rests PORT_QUARANTINE_SECONDS before another connection takes it;
- `FrontGate` answers every method UNAUTHENTICATED on a refused connection, and
  `FrontIdentity` reads the record for each call: a refused connection is answered
  UNAUTHENTICATED with the reason, a connection the front does not know (someone connecting to
  the private port directly) too.
- a refused connection is closed REFUSED_SECONDS after its handshake (no slot held for ever
  without a good certificate); an accepted one whose certificate chain expires while it is open
  is refused from then on (`Peer.reason`).

Open files: a connection holds FDS_PER_CONNECTION (3) of them in this process (the client's
socket, the forwarding one, the gRPC server's side of it). At start the front raises the soft
RLIMIT_NOFILE toward the hard limit as far as MAX_CONNECTIONS and FD_HEADROOM (SQL, Redis,
metrics, ...) need (`fit_open_file_limit`); where the hard limit is lower, its cap is lowered to
what fits (`connection_cap`) and a warning, once, says how to raise it. A connection beyond the
cap is closed as it arrives, never an EMFILE elsewhere.

The certificate, key and client CA are reloaded as for gRPC's own TLS (`ReloadingCertificates`:
looked at before new handshakes, at most once a second, and by a watcher every
RELOAD_CHECK_SECONDS; a pair that does not match is not taken); connections already open keep
their server certificate. A new client CA file takes effect for new handshakes at once, and
judges the open connections again: a chain that no longer leads to one of its CAs is refused
from then on (NO_LONGER_TRUSTED), then closed, as a new handshake would be. The rule: once the
front has taken the new file, no call is served on a verdict the old one made. Taking it bumps
`Peers.generation` (every verdict out of date at once, O(1)), and a verdict out of date is
judged again before it is given out (`Peers.current`, so FrontGate judges a call's connection
before the call is served, ~0.14 ms, once per connection); a pass (`TlsFront.rejudge_pass`)
judges the rest REJUDGE_CHUNK connections at a time, letting the event loop go between (all of
MAX_CONNECTIONS at once held it ~1.4 s), and closes the refused ones that make no call. A change
during a pass makes that pass start over with the newest CAs; there is never a second one. No TLS
session is ever resumed (a resumed one brings its certificate back without a verification), and
renegotiation is off.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import resource
import time
from dataclasses import dataclass, field, replace
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL.crypto import X509, X509StoreContext, X509StoreContextError

from authz_server.server.auth import Principal, Unauthenticated
from authz_server.server.errors import to_status
from authz_server.server.tls import (
    RELOAD_CHECK_SECONDS,
    Files,
    ReloadingCertificates,
    certificate_merchant,
)
from authz_server.server.wrapped_server import Handler, WrappedServer

log = logging.getLogger(__name__)

# A TLS handshake not finished within this is dropped (slow or idle clients hold no slot).
HANDSHAKE_SECONDS = 10.0
# Connections one process's front holds at once; more are closed as they arrive. Fewer when the
# process's open-file limit cannot be raised far enough (fit_open_file_limit).
MAX_CONNECTIONS = 10_000
# File descriptors one front connection holds: the client's socket, the forwarding connection's,
# and the gRPC server's side of it (in the same process).
FDS_PER_CONNECTION = 3
# File descriptors kept for the rest of the process beside the front's connections: SQL and
# Redis pools, the metrics server, logs, gRPC's own (epoll, wakeup fds, its listener), the
# front's listener, and the socket of a connection accepted only to be refused at the cap.
FD_HEADROOM = 512
# Open connections judged again in one go when the client CA file changes, before the event
# loop is let go (~0.14 ms each: 200 hold the loop ~30 ms).
REJUDGE_CHUNK = 200
# A refused connection (no certificate, another CA's, ...) is closed this long after its
# handshake: its calls are answered UNAUTHENTICATED until then, and it holds no slot for ever.
REFUSED_SECONDS = 10.0
# A local port whose forwarding connection closed is not used for another this long (Peers).
# Loopback may reuse a port in TIME_WAIT after 1 s (tcp_tw_reuse=2); a call still queued 10 s
# after its connection closed is a server past saving. Not longer: every connection closed
# holds a port this long, and ~28,000 ports / 10 s is more than the front can handshake.
PORT_QUARANTINE_SECONDS = 10.0
# Connections to the gRPC server tried for one client before giving up (a quarantined port).
CONNECT_ATTEMPTS = 5
# Bytes taken from OpenSSL at a time.
CHUNK = 64 * 1024
# gRPC's name for a call's peer on the private listener, before the port.
PRIVATE_PEER = "ipv4:127.0.0.1:"
PRIVATE_HOST = "127.0.0.1"

NOT_THROUGH_THE_FRONT = "the connection did not come through the service's TLS port"
NO_CERTIFICATE = "no client certificate: under mutual TLS every caller presents one"
EXPIRED = "the client certificate has expired"
UNKNOWN_CA = "the client certificate is not signed by a CA this service trusts"
CA_AS_CLIENT = "the client certificate is a CA's, not a client's"
NO_LONGER_TRUSTED = "the client certificate's CA is no longer trusted (the client CA file changed)"
# OpenSSL's X509_V_ERR_* numbers -> the reason a caller is told.
VERIFY_REASONS = {
    2: UNKNOWN_CA,  # unable to get issuer certificate
    7: "the client certificate's signature does not verify",
    9: "the client certificate is not yet valid",
    10: EXPIRED,
    18: UNKNOWN_CA,  # self-signed
    19: UNKNOWN_CA,  # self-signed certificate in the chain
    20: UNKNOWN_CA,  # unable to get the local issuer certificate
    21: UNKNOWN_CA,  # unable to verify the first certificate
    26: "the client certificate is not for client authentication",  # invalid purpose
}


@dataclass(frozen=True)
class Peer:
    """What the front learnt of a connection in its handshake: the merchant its certificate
    names (None: none, or no client CA), or why its calls are refused."""

    merchant: Principal | None = None
    refusal: str | None = None
    # when the verified chain's first certificate expires (time.time()); None: no certificate
    not_after: float | None = None
    # the chain the client presented, leaf first: judged again when the client CA file changes
    chain: tuple[x509.Certificate, ...] = field(default=(), compare=False, repr=False)
    # the client CA file's generation (Peers.generation) this verdict was reached under
    generation: int = field(default=0, compare=False)

    def reason(self) -> str | None:
        """Why a call on this connection is refused now (None: it is not). A connection
        outlives its certificate (gRPC keeps channels open for days): an expired one is
        refused from then on, as a new handshake would be."""
        if self.refusal is not None:
            return self.refusal
        if self.not_after is not None and time.time() >= self.not_after:
            return EXPIRED
        return None


class Peers:
    """The front's connections by the local port of their forwarding connection. A port whose
    connection closed is not taken again for PORT_QUARANTINE_SECONDS: a call of the old
    connection still queued in the gRPC server must never be judged as the new one's.

    When the client CA file changes (`trust`), every verdict reached under the old file is out
    of date at once (its `generation` behind): one is judged again against the new CAs before
    it is given out (`current`, `of`), so a call is never served on a verdict the old file made,
    whether or not the front's pass over the open connections has reached it yet."""

    def __init__(self) -> None:
        self.by_port: dict[int, Peer] = {}
        # port -> when its connection closed, oldest first
        self.released: dict[int, float] = {}
        # bumped at each change of the client CA file; `context` holds the CAs of the newest
        self.generation = 0
        self.context: SSL.Context | None = None

    def trust(self, context: SSL.Context) -> None:
        """The client CA file changed: `context`'s CAs judge every verdict from now on."""
        self.context = context
        self.generation += 1

    def current(self, port: int) -> Peer | None:
        """The verdict on the connection under `port`, judged again first if the client CA file
        changed since it was reached."""
        peer = self.by_port.get(port)
        if peer is None or peer.generation == self.generation:
            return peer
        judged = replace(peer, generation=self.generation)
        if peer.refusal is None and peer.chain:
            # the new chain's end of validity, not the old one's (a CA re-issued shorter)
            not_after = None if self.context is None else _trusted(peer.chain, self.context)
            if not_after is None:
                judged = replace(judged, refusal=NO_LONGER_TRUSTED)
                log.info("TLS front: a connection's client certificate is no longer trusted")
            else:
                judged = replace(judged, not_after=not_after)
        self.by_port[port] = judged
        return judged

    def take(self, port: int, peer: Peer) -> bool:
        """Records `peer` under `port`; False: the port is in use or quarantined."""
        now = time.monotonic()
        while self.released:
            oldest, released_at = next(iter(self.released.items()))
            if now - released_at < PORT_QUARANTINE_SECONDS:
                break
            del self.released[oldest]
        if port in self.by_port or port in self.released:
            return False
        self.by_port[port] = peer
        return True

    def release(self, port: int) -> None:
        if self.by_port.pop(port, None) is not None:
            self.released[port] = time.monotonic()

    def of(self, peer: str) -> Peer | None:
        if not peer.startswith(PRIVATE_PEER):
            return None
        port = peer[len(PRIVATE_PEER) :]
        return self.current(int(port)) if port.isdigit() else None


class FrontIdentity:
    """Who a call is, as the front saw its connection (Authenticator's client identity)."""

    def __init__(self, peers: Peers, mutual: bool) -> None:
        self.peers = peers
        self.mutual = mutual

    def merchant(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal | None:
        peer = self.peers.of(context.peer())
        if peer is None:
            raise Unauthenticated(NOT_THROUGH_THE_FRONT)
        reason = peer.reason()
        if reason is not None:
            raise Unauthenticated(reason)
        return peer.merchant


def server_context(files: Files) -> SSL.Context:
    """TLS 1.2 or later, the server's certificate chain, h2 by ALPN; with a client CA, a client
    certificate asked for and verified (the verdict kept on the connection, not enforced)."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
    # No session is ever resumed: a resumed session brings back its certificate without a new
    # verification, and the verdict (kept on the connection, not in the session) would be lost:
    # a certificate refused once would be taken unverified the next time.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    chain = x509.load_pem_x509_certificates(files.certificate)
    context.use_certificate(chain[0])
    for extra in chain[1:]:
        context.add_extra_chain_cert(extra)
    key = serialization.load_pem_private_key(files.key, password=None)
    context.use_privatekey(key)  # type: ignore[arg-type]
    context.check_privatekey()
    context.set_alpn_select_callback(_alpn)
    if files.client_ca is not None:
        store = context.get_cert_store()
        assert store is not None
        for authority in x509.load_pem_x509_certificates(files.client_ca):
            store.add_cert(X509.from_cryptography(authority))
            context.add_client_ca(authority)
        context.set_verify(SSL.VERIFY_PEER, _keep_verdict)
    return context


def _context_and_client_ca(files: Files) -> tuple[SSL.Context, bytes | None]:
    return server_context(files), files.client_ca


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def _alpn(_connection: SSL.Connection, offered: list[bytes]) -> bytes:
    # gRPC clients insist on h2; anything else ends the handshake
    return b"h2" if b"h2" in offered else b""


def _keep_verdict(
    connection: SSL.Connection, _certificate: Any, error: int, _depth: int, ok: int
) -> bool:
    """OpenSSL's verdict on each certificate of the client's chain: the first error is kept on
    the connection, and the handshake goes on (the calls are refused, UNAUTHENTICATED)."""
    if not ok:
        client = connection.get_app_data()
        if client is not None and client.verify_error is None:
            client.verify_error = error
    return True


def fit_open_file_limit(connections: int) -> int:
    """Raises the process's soft open-file limit (RLIMIT_NOFILE) toward its hard limit, as far as
    `connections` front connections and FD_HEADROOM need (never lowers it; Go's runtime raises
    it likewise). Returns how many connections fit: `connections`, or fewer when even the hard
    limit is too low."""
    needed = FDS_PER_CONNECTION * connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError) as error:  # e.g. above fs.nr_open
                log.warning("TLS front: the open-file limit not raised to %d: %r", target, error)
            else:
                log.info("TLS front: the open-file limit raised from %d to %d", soft, target)
                soft = target
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return connections
    return max(1, (soft - FD_HEADROOM) // FDS_PER_CONNECTION)


class TlsFront:
    """The public TLS port of one process, forwarding to its gRPC server's private port."""

    def __init__(
        self, certificates: ReloadingCertificates, identity_field: str = "uri_san"
    ) -> None:
        self.certificates = certificates
        self.identity_field = identity_field
        self.mutual = certificates.client_ca_file is not None
        self.peers = Peers()
        self.identity = FrontIdentity(self.peers, self.mutual)
        # the context, and the client CA file's contents it was made with
        self.context, self.client_ca = certificates.initial(_context_and_client_ca)
        self.connections: set[_Client] = set()
        self.server: asyncio.Server | None = None
        self.upstream_port = 0
        self.handshake_seconds = HANDSHAKE_SECONDS
        self.refused_seconds = REFUSED_SECONDS
        self.full = False  # the cap reached (logged once until a connection is taken)
        # connections the process's open-file limit fits (start: fit_open_file_limit); None:
        # not looked at yet, MAX_CONNECTIONS alone caps them
        self.fd_connections: int | None = None
        self.watcher: asyncio.Task[None] | None = None
        # the pass judging the open connections again after a client CA change (one at a time)
        self.rejudging: asyncio.Task[None] | None = None
        self.rejudge_chunk = REJUDGE_CHUNK

    def connection_cap(self) -> int:
        """Connections this front holds at once: MAX_CONNECTIONS, or fewer if the open-file
        limit fits fewer."""
        if self.fd_connections is None:
            return MAX_CONNECTIONS
        return min(MAX_CONNECTIONS, self.fd_connections)

    def current_context(self) -> SSL.Context:
        reloaded = self.certificates.reloaded(_context_and_client_ca)
        if reloaded is not None:
            self.context, client_ca = reloaded
            # only another client CA file can change a verdict: a renewed server certificate
            # does not cost a verification of every open connection
            if self.mutual and client_ca != self.client_ca:
                # every open connection's verdict out of date at once (judged again before its
                # next call is served), new handshakes on the new CAs; the pass catches up
                self.peers.trust(self.context)
                self._rejudge_open_connections()
            self.client_ca = client_ca
        return self.context

    def _rejudge_open_connections(self) -> None:
        """Starts the pass over the open connections, unless one runs: that one starts over
        with the newest CAs when it sees the change (never two passes at once)."""
        if self.rejudging is None or self.rejudging.done():
            loop = asyncio.get_running_loop()
            self.rejudging = loop.create_task(self.rejudge_pass(), name="tls-front-rejudge")

    async def rejudge_pass(self) -> None:
        """Judges every open connection again against the newest client CAs, `rejudge_chunk` at
        a time with the event loop let go between (at MAX_CONNECTIONS one pass would hold it
        ~1.4 s): a refused one is answered UNAUTHENTICATED, then closed, as a new handshake
        would be. A connection the pass has not reached yet is judged by its next call first
        (Peers.current); the pass brings the ones that make no call their closing. Another
        change during the pass starts it over."""
        generation = -1
        while generation != self.peers.generation:
            generation = self.peers.generation
            clients = list(self.connections)
            for start in range(0, len(clients), self.rejudge_chunk):
                for client in clients[start : start + self.rejudge_chunk]:
                    try:
                        client.judge_again()
                    except Exception:  # the others are still judged (and this one per call)
                        log.exception("TLS front: judging a connection again failed")
                await asyncio.sleep(0)
                if generation != self.peers.generation:
                    break  # the file changed again: over, with the newest CAs

    async def _watch(self) -> None:
        """Looks at the files even while no connection arrives: a CA taken out of the client CA
        file reaches the connections already open within about RELOAD_CHECK_SECONDS."""
        while True:
            await asyncio.sleep(RELOAD_CHECK_SECONDS)
            try:
                self.current_context()
            except Exception:  # the watcher goes on: a later change is still taken
                log.exception("TLS front: judging the open connections again failed")

    async def start(self, host: str, port: int, upstream_port: int) -> int:
        """Listens on host:port (SO_REUSEPORT: every worker's front on the same port); returns
        the port. First the process's open-file limit is raised as far as the front needs, or
        its cap lowered to what the limit fits (a warning says how to raise it)."""
        self.fd_connections = fit_open_file_limit(MAX_CONNECTIONS)
        if self.fd_connections < MAX_CONNECTIONS:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning(
                "TLS front: the open-file limit (RLIMIT_NOFILE soft %d, hard %d) fits %d "
                "connections, not %d (MAX_CONNECTIONS; %d files each, %d kept for the rest): "
                "more are refused. Raise the hard limit to at least %d (systemd LimitNOFILE=, "
                "docker run --ulimit nofile=, compose ulimits:, on Kubernetes the container "
                "runtime's default; see deploy/RUNBOOK.md)",
                soft,
                hard,
                self.fd_connections,
                MAX_CONNECTIONS,
                FDS_PER_CONNECTION,
                FD_HEADROOM,
                FDS_PER_CONNECTION * MAX_CONNECTIONS + FD_HEADROOM,
            )
        self.upstream_port = upstream_port
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Client(self), host.strip("[]") or None, port, reuse_port=True, backlog=1024
        )
        bound = int(self.server.sockets[0].getsockname()[1])
        self.watcher = loop.create_task(self._watch(), name="tls-front-reload")
        log.info(
            "TLS front on port %d, the gRPC server behind it on %s:%d; client certificates %s",
            bound,
            PRIVATE_HOST,
            upstream_port,
            "checked per call" if self.mutual else "not asked for",
        )
        return bound

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def close(self) -> None:
        """Closes the connections left (after the gRPC server's grace) and the listener."""
        self.stop_accepting()
        for task in (self.watcher, self.rejudging):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for client in list(self.connections):
            client.abort()
        if self.server is not None:
            await self.server.wait_closed()

    def peer(self, connection: SSL.Connection, verify_error: int | None) -> Peer:
        if not self.mutual:
            return Peer()
        certificate = connection.get_peer_certificate(as_cryptography=True)
        if certificate is None:
            return Peer(refusal=NO_CERTIFICATE)
        if verify_error is not None:
            reason = VERIFY_REASONS.get(
                verify_error, f"the client certificate is not accepted (error {verify_error})"
            )
            return Peer(refusal=reason)
        if _is_ca(certificate):  # OpenSSL's ssl_client purpose lets a CA's through as a leaf
            return Peer(refusal=CA_AS_CLIENT)
        chain = connection.get_verified_chain(as_cryptography=True) or [certificate]
        not_after = min(c.not_valid_after_utc for c in chain).timestamp()
        try:
            merchant = certificate_merchant(certificate, self.identity_field)
        except Unauthenticated as refused:
            return Peer(refusal=str(refused))
        # judged again with what the client sent, not the verified chain: that one holds the
        # CAs the old file supplied, which would vouch for the leaf after leaving the file
        sent = connection.get_peer_cert_chain(as_cryptography=True) or []
        presented = (certificate, *(c for c in sent if c != certificate))
        return Peer(merchant=merchant, not_after=not_after, chain=presented)


def _trusted(chain: tuple[x509.Certificate, ...], context: SSL.Context) -> float | None:
    """When the chain (leaf first, as the client presented it in its handshake) verified up to
    a CA of the context's store now ends its validity (time.time()), as a new handshake would
    find; None: it leads to none of them (or is out of its dates)."""
    store = context.get_cert_store()
    if store is None:
        return None
    leaf, *rest = (X509.from_cryptography(certificate) for certificate in chain)
    try:
        verified = X509StoreContext(store, leaf, rest).get_verified_chain()
    except X509StoreContextError:
        return None
    return min(c.to_cryptography().not_valid_after_utc for c in verified).timestamp()


class _Client(asyncio.Protocol):
    """One TLS connection from a client; its plaintext side goes to the gRPC server."""

    def __init__(self, front: TlsFront) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.tls: SSL.Connection | None = None
        self.verify_error: int | None = None
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []  # decrypted before the upstream connection was made
        self.paused_for: set[str] = set()  # why reading from the client is paused
        self.timer: asyncio.TimerHandle | None = None
        # a refused connection's end (REFUSED_SECONDS after its handshake)
        self.refused_timer: asyncio.TimerHandle | None = None
        self.context: SSL.Context | None = None  # the one its handshake was made with
        self.generation = 0  # the client CA file's generation that context holds
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        cap = self.front.connection_cap()
        if len(self.front.connections) >= cap:
            if not self.front.full:  # once each time it fills up, not once per connection
                log.warning("TLS front: %d connections open, refusing more", cap)
            self.front.full = True
            self.closed = True
            self.transport.abort()
            return
        self.front.full = False
        self.front.connections.add(self)
        self.context = self.front.current_context()
        self.generation = self.front.peers.generation
        self.tls = SSL.Connection(self.context, None)
        self.tls.set_app_data(self)
        self.tls.set_accept_state()
        self.timer = asyncio.get_running_loop().call_later(self.front.handshake_seconds, self.abort)

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        if tls is None or self.closed:
            return
        tls.bio_write(data)
        if self.timer is not None:  # handshaking
            try:
                tls.do_handshake()
            except SSL.WantReadError:
                self.flush()
                return
            except SSL.Error as error:
                log.debug("TLS front: handshake failed: %r", error)
                self.flush()
                self.close()
                return
            self.timer.cancel()
            self.timer = None
            self.flush()
            self.pause("connecting")
            peer = replace(self.front.peer(tls, self.verify_error), generation=self.generation)
            asyncio.get_running_loop().create_task(self.connect(peer))
        self.decrypt()

    async def connect(self, peer: Peer) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(CONNECT_ATTEMPTS):  # another port when the one given is quarantined
            try:
                await loop.create_connection(
                    lambda: _Upstream(self, peer), PRIVATE_HOST, self.front.upstream_port
                )
            except OSError as error:
                log.warning("TLS front: the gRPC server's port does not answer: %r", error)
                self.close()
                return
            if self.upstream is not None:
                break
        else:
            log.warning("TLS front: no free local port for the gRPC server's connection")
            self.close()
            return
        if self.closed:
            if self.upstream is not None and self.upstream.transport is not None:
                self.upstream.transport.close()
            return
        assert self.upstream is not None and self.upstream.transport is not None
        for data in self.pending:
            self.upstream.transport.write(data)
        self.pending.clear()
        self.resume("connecting")
        # judged again now if the client CA file changed during its handshake
        self.judge_again()

    def refuse_later(self) -> None:
        """A refused connection's calls are answered UNAUTHENTICATED for REFUSED_SECONDS, then
        it is closed (it holds no slot for ever)."""
        if self.refused_timer is None and not self.closed:
            loop = asyncio.get_running_loop()
            self.refused_timer = loop.call_later(self.front.refused_seconds, self.close, True)

    def judge_again(self) -> None:
        """Its verdict, judged again if the client CA file changed since it was reached
        (Peers.current: a chain that no longer leads to a CA of the file is refused, as a new
        handshake would be); a refused connection is closed REFUSED_SECONDS later. Once
        connected; one still connecting is judged as it connects."""
        upstream = self.upstream
        if upstream is None or not upstream.port or self.closed:
            return  # judged as it connects
        peer = self.front.peers.current(upstream.port)
        if peer is not None and peer.refusal is not None:
            self.refuse_later()

    def decrypt(self) -> None:
        """Everything OpenSSL has decrypted, to the gRPC server."""
        assert self.tls is not None
        while True:
            try:
                data = self.tls.recv(CHUNK)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # the client's close_notify
                self.close()
                break
            except SSL.Error as error:
                log.debug("TLS front: connection failed: %r", error)
                self.close()
                break
            upstream = self.upstream.transport if self.upstream is not None else None
            if upstream is None:
                self.pending.append(data)
            else:
                upstream.write(data)
        self.flush()

    def send(self, data: bytes) -> None:
        """The gRPC server's bytes, encrypted, to the client."""
        if self.tls is None or self.closed:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[self.tls.send(view) :]
        except SSL.Error as error:
            log.debug("TLS front: connection failed: %r", error)
            self.close()
            return
        self.flush()

    def flush(self) -> None:
        assert self.tls is not None and self.transport is not None
        while True:
            try:
                data = self.tls.bio_read(CHUNK)
            except SSL.WantReadError:
                return
            if not data:
                return
            self.transport.write(data)

    def pause(self, reason: str) -> None:
        if not self.paused_for and self.transport is not None:
            self.transport.pause_reading()
        self.paused_for.add(reason)

    def resume(self, reason: str) -> None:
        self.paused_for.discard(reason)
        if not self.paused_for and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # the client's transport full: stop reading from the gRPC server, and go on when it drains
    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.front.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.refused_timer is not None:
            self.refused_timer.cancel()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def close(self, notify: bool = False) -> None:
        """Closes both sides, what is written so far sent first (`notify`: a TLS close_notify
        before it)."""
        if self.closed:
            return
        self.closed = True
        if notify and self.tls is not None and self.timer is None:
            try:
                self.tls.shutdown()
                self.flush()
            except SSL.Error:
                pass
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()


class _Upstream(asyncio.Protocol):
    """The plaintext connection to the gRPC server's private port for one client."""

    def __init__(self, client: _Client, peer: Peer) -> None:
        self.client = client
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        # Before any byte goes to the gRPC server: what the call will be asked about.
        port = int(self.transport.get_extra_info("sockname")[1])
        if not self.client.front.peers.take(port, self.peer):
            self.transport.abort()  # connection_lost: nothing to release, the client stays
            return
        self.port = port
        self.client.upstream = self

    def data_received(self, data: bytes) -> None:
        self.client.send(data)

    # the gRPC server's side full: stop reading from the client, and go on when it drains
    def pause_writing(self) -> None:
        self.client.pause("upstream full")

    def resume_writing(self) -> None:
        self.client.resume("upstream full")

    def eof_received(self) -> bool:
        if self.port:
            self.client.close(notify=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.port:
            self.client.front.peers.release(self.port)
            self.client.close(notify=True)


class FrontGate(WrappedServer):
    """Every method, of every service (health and reflection too, which ask for no principal),
    answers a call on a connection the front refused, or does not know, UNAUTHENTICATED before
    its handler runs: under mutual TLS nothing is served without a good certificate."""

    def __init__(self, server: grpc.aio.Server, peers: Peers) -> None:
        super().__init__(server)
        self.peers = peers

    async def check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Aborts the call (UNAUTHENTICATED, with the reason) unless the front accepted its
        connection."""
        peer = self.peers.of(context.peer())
        reason = NOT_THROUGH_THE_FRONT if peer is None else peer.reason()
        if reason is not None:
            await context.abort_with_status(to_status(Unauthenticated(reason)))

    def wrap(self, full_method: str, handler: Handler) -> Handler:
        check = self.check
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        behaviour: Any = (
            handler.unary_unary
            or handler.stream_unary
            or handler.unary_stream
            or handler.stream_stream
        )

        async def yielded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            async for response in behaviour(request, context):
                yield response

        async def answered(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            return await behaviour(request, context)

        # a stream of answers yielded; or one answer, or a stream written with context.write
        gated = yielded if inspect.isasyncgenfunction(behaviour) else answered

        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.stream_unary_rpc_method_handler
            if handler.stream_unary is not None
            else grpc.unary_stream_rpc_method_handler
            if handler.unary_stream is not None
            else grpc.stream_stream_rpc_method_handler
        )
        return make(gated, **serializers)

    async def start(self) -> None:
        """Last of all the handlers, one for the methods the server does not have: on a refused
        connection it answers UNAUTHENTICATED too (else a client without a good certificate
        could tell by probing which methods exist), on an accepted one UNIMPLEMENTED as gRPC
        would. Added to the grpc.aio server itself, past the layers between: an unknown method
        is neither limited, observed (a made-up name would be a metric label) nor audited."""
        server: grpc.aio.Server = self.server
        while isinstance(server, WrappedServer):
            server = server.server
        server.add_generic_rpc_handlers((_UnknownMethods(self),))
        await super().start()


class _UnknownMethods(grpc.GenericRpcHandler):
    """Any method no handler before it took (FrontGate.start)."""

    def __init__(self, gate: FrontGate) -> None:
        async def refused(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await gate.check(context)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

        # bytes in, bytes out (no message type is known); any arity reads as a stream
        self.handler: Handler = grpc.stream_stream_rpc_method_handler(refused)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler:
        return self.handler
