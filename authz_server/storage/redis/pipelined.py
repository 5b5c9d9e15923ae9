"""One auto-pipelining Redis connection per process, for the hot path.

redis-py's asyncio client checks a connection out of its pool, builds a Pipeline object, packs
the commands in Python and fires its event dispatcher on every call: 135-210 µs of client CPU
for Authorize's four commands. Here every call of the process shares one connection: the
commands issued during one event-loop iteration leave in one socket write (hiredis packs them in
C), hiredis (redis-py's own C parser, the `redis[hiredis]` extra) parses the replies, and the
replies go to their callers in order, since Redis answers the commands of one connection in the
order they arrive: 16-20 µs for the same commands (python -m loadtest.redis_client_benchmark).
One connection is enough: Redis runs commands on one thread, and a second connection measured
no better.

Matching replies by order is only sound while nothing is lost, so the failure rules are strict:
- a lost connection fails every command in flight with redis ConnectionError (the service maps
  it to UNAVAILABLE); the next call connects again;
- a command not answered within `timeout_seconds` fails with TimeoutError and the connection is
  dropped (its reply may still arrive and would be matched to the next caller); every other
  command in flight fails with ConnectionError;
- a bounded number of commands may be in flight (PENDING_COMMANDS_LIMIT); beyond it a call fails
  at once with TooManyPendingCommands (a RedisError: UNAVAILABLE as well).
Error replies are exceptions (ResponseError and its redis-py subclasses) returned in place by
execute_many, so a caller can look at each command's outcome, and raised by execute.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from authz_server.observability import tracing
from authz_server.storage.redis.generation import refused_slot
from authz_server.storage.redis.runs import RUN_COMMANDS, run_of

Argument: TypeAlias = str | bytes | int
Command: TypeAlias = tuple[Argument, ...]
# What RESP2 answers: bulk strings as bytes, integers, nil, arrays, and error replies (which
# may also appear inside an array, e.g. an EXEC reply).
Reply: TypeAlias = "bytes | int | ResponseError | list[Reply] | None"

# At most this many commands in flight on the connection. Beyond it a call fails at once
# rather than waiting for room: 10,000 commands is far more than Redis has in hand when it keeps
# up (an Authorize is 4), so reaching it means Redis is far behind; a caller waiting for room
# would wait at least as long as those commands take, on top of its own, and most would time out
# anyway, with their memory held meanwhile. UNAVAILABLE at once lets the clients' retry back off
# and spreads the load instead of piling it up here.
PENDING_COMMANDS_LIMIT = 10_000

# hiredis.pack_command packs a whole command in C (str as UTF-8, int as decimal, as redis-py
# does). Its stub declares a one-element tuple; any length is accepted.
_pack: Callable[[Command], bytes] = hiredis.pack_command  # type: ignore[assignment]

if TYPE_CHECKING:
    from authz_server.storage.redis.generation import HotStateGeneration

# Error reply codes redis-py turns into its own subclasses; the rest are ResponseError.
_ERROR_KINDS: dict[str, type[ResponseError]] = {
    "NOSCRIPT": NoScriptError,
    "READONLY": ReadOnlyError,
    "OOM": OutOfMemoryError,
    "NOPERM": NoPermissionError,
}


class TooManyPendingCommands(RedisError):
    """PENDING_COMMANDS_LIMIT commands are already waiting for Redis."""


class UntrustedRedis(RedisConnectionError):
    """A script was about to go to a Redis process the hot state was not built on (a replica
    promoted, a Redis restarted with its file): not sent; UNAVAILABLE until the guardian has
    rebuilt the hot state there, or found it is the one."""


def _reply_error(message: str) -> ResponseError:
    """hiredis builds error replies with this (and returns them, never raises them)."""
    code = message.split(" ", 1)[0]
    if code == "ERR" and _SCRIPT_READ_ONLY in message:
        # A script's write refused on a replica comes wrapped (Redis 7: "ERR Error running
        # script ... -READONLY ..."): still the sign of a primary demoted under us.
        return ReadOnlyError(message)
    return _ERROR_KINDS.get(code, ResponseError)(message)


_SCRIPT_READ_ONLY = "-READONLY "


def as_integer(reply: Reply) -> int:
    """A Redis integer, or a number sent as a bulk string."""
    if isinstance(reply, int):
        return reply
    if isinstance(reply, bytes):
        return int(reply)
    raise ResponseError(f"expected a number from Redis, got {reply!r}")


def answered(reply: Reply) -> Reply:
    """One reply of execute_many, or its error raised."""
    if isinstance(reply, ResponseError):
        raise reply
    return reply


def all_answered(replies: list[Reply]) -> list[Reply]:
    """The replies of execute_many, or its first error reply raised (as redis-py did)."""
    for reply in replies:
        answered(reply)
    return replies


def as_list(reply: Reply) -> list[Reply]:
    if isinstance(reply, list):
        return reply
    raise ResponseError(f"expected an array from Redis, got {reply!r}")


def as_text(reply: Reply) -> str:
    """A bulk string decoded; anything else as str() shows it (as redis-py's callers did)."""
    return reply.decode() if isinstance(reply, bytes) else str(reply)


@dataclass(frozen=True)
class Script:
    """A Lua script run by EVALSHA; its SHA1 is computed here, as Redis computes it."""

    source: str
    # What trace spans call it (storage/redis/scripts.py names each by its file).
    name: str = field(default="script", compare=False)
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())
        SCRIPT_NAMES[self.sha] = self.name


# SHA1 -> name of every Script made, for the trace spans of the round trips that run them.
SCRIPT_NAMES: dict[str, str] = {}


def _scripts_in(commands: Sequence[Command]) -> list[str]:
    return [SCRIPT_NAMES.get(str(c[1]), "script") for c in commands if c and c[0] == "EVALSHA"]


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis listens and how to log in, from the same URL redis-py's pool is built from."""

    host: str = "localhost"
    port: int = 6379
    unix_socket_path: str = ""
    database: int = 0
    username: str = ""
    password: str = ""

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """redis://[[user]:password@]host[:port][/db] or unix:///path?db=N, parsed by redis-py's
        own parse_url so both clients always reach the same server and database."""
        if url.startswith("rediss://"):
            raise ValueError("PipelinedRedis does not speak TLS: use redis:// or unix://")
        options = parse_url(url)
        return cls(
            host=str(options.get("host") or "localhost"),
            port=int(options.get("port") or 6379),
            unix_socket_path=str(options.get("path") or ""),
            database=int(options.get("db") or 0),
            username=str(options.get("username") or ""),
            password=str(options.get("password") or ""),
        )

    def login_commands(self) -> list[Command]:
        """AUTH (when there is a password), then SELECT (when not database 0)."""
        commands: list[Command] = []
        if self.password:
            if self.username:
                commands.append(("AUTH", self.username, self.password))
            else:
                commands.append(("AUTH", self.password))
        if self.database:
            commands.append(("SELECT", self.database))
        return commands

    def __str__(self) -> str:
        where = self.unix_socket_path or f"{self.host}:{self.port}"
        return f"{where} database {self.database}"


class _Pending:
    """The commands of one call, in flight: replies collect until all of them came."""

    __slots__ = ("deadline", "expected", "future", "last_turn_given", "replies")

    def __init__(self, future: asyncio.Future[list[Reply]], expected: int, deadline: float) -> None:
        self.future = future
        self.expected = expected
        # From the write (set again then), not from the queueing: see _flush.
        self.deadline = deadline
        # Past its deadline once, and given one more turn of the loop: see _check_deadline.
        self.last_turn_given = False
        self.replies: list[Reply] = []


class _Connection(asyncio.Protocol):
    """One socket to Redis. Commands queue in `outgoing` until the end of the current event
    loop iteration, then leave in one write; `in_flight` holds the calls in the order their
    commands were sent, which is the order their replies come back."""

    def __init__(self, timeout_seconds: float, pending_limit: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_seconds = timeout_seconds
        self._pending_limit = pending_limit
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=_reply_error)
        self._in_flight: deque[_Pending] = deque()
        self._outgoing: list[bytes] = []
        self._unwritten_calls = 0  # the last calls of in_flight, their commands in outgoing
        self._flush_scheduled = False
        # One timer for the oldest call only: replies come in order, so the oldest call is the
        # first to run out of time. Cheaper than a timer per call.
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.pending_commands = 0
        self.closed = False
        # The Redis run at the other end (runs.RedisRun.text), read at connect when a run gate
        # is set, and again when the gate does not trust it, once for each trusted set the gate
        # adopts (`reading`: that read, which the calls refused meanwhile wait for): a Redis
        # keeps its connections when it is demoted and promoted back, or takes a new
        # replication id, and its run changes under them.
        self.run = ""
        self.reading: tuple[frozenset[str], asyncio.Future[str]] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, hence no check).
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, error: Exception | None) -> None:
        reason = f": {error}" if error else ""
        self.drop(RedisConnectionError(f"connection to Redis lost{reason}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        in_flight = self._in_flight
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as error:
                self.drop(RedisConnectionError(f"Redis protocol error: {error}"))
                return
            if reply is False:  # hiredis's "no complete reply yet"; Redis never answers False
                return
            if not in_flight:
                self.drop(RedisConnectionError("Redis answered a command never sent"))
                return
            call = in_flight[0]
            call.replies.append(reply)
            if len(call.replies) == call.expected:
                in_flight.popleft()
                self.pending_commands -= call.expected
                if not call.future.done():  # done: its caller was cancelled
                    call.future.set_result(call.replies)
                if not in_flight and self._drained is not None and not self._drained.done():
                    self._drained.set_result(None)

    # --- sending ----------------------------------------------------------------------------

    def send(self, commands: Sequence[Command]) -> asyncio.Future[list[Reply]]:
        """Queues the commands (at least one) for the next write; the future gets their
        replies in order. Raises at once when closed or too many commands are in flight."""
        if self.closed:
            raise RedisConnectionError("connection to Redis closed")
        count = len(commands)
        if self.pending_commands + count > self._pending_limit:
            raise TooManyPendingCommands(
                f"{self.pending_commands} Redis commands in flight; the limit is "
                f"{self._pending_limit}"
            )
        packed = [_pack(command) for command in commands]  # a bad argument raises before queuing
        loop = self._loop
        future: asyncio.Future[list[Reply]] = loop.create_future()
        call = _Pending(future, count, loop.time() + self._timeout_seconds)
        self._in_flight.append(call)
        self._unwritten_calls += 1
        self.pending_commands += count
        self._outgoing.extend(packed)
        if not self._flush_scheduled:
            # After the callbacks already due in this iteration: every call made meanwhile joins
            # the same write.
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(call.deadline, self._check_deadline)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or not self._outgoing or self._transport is None:
            return
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        self._transport.write(data)
        # Redis's time runs from the write: a loop kept busy between a call and this write
        # (other callbacks, a starved thread) is not Redis failing to answer.
        deadline = self._loop.time() + self._timeout_seconds
        in_flight = self._in_flight
        for index in range(1, min(self._unwritten_calls, len(in_flight)) + 1):
            in_flight[-index].deadline = deadline
        self._unwritten_calls = 0

    def _check_deadline(self) -> None:
        self._deadline_timer = None
        if self.closed or not self._in_flight:
            return
        oldest = self._in_flight[0]
        if oldest.deadline > self._loop.time():
            self._deadline_timer = self._loop.call_at(oldest.deadline, self._check_deadline)
        elif not oldest.last_turn_given:
            # A loop busy past the deadline may run this timer before the write it had queued
            # (uvloop runs due timers before the callbacks scheduled with call_soon): one more
            # turn, in which _flush writes and sets the deadline from then, or the socket is read.
            oldest.last_turn_given = True
            self._deadline_timer = self._loop.call_later(0, self._check_deadline)
        else:
            self.drop(
                RedisConnectionError("connection to Redis dropped: an earlier command timed out"),
                oldest_error=TimeoutError(f"Redis did not answer within {self._timeout_seconds} s"),
            )

    # --- ending -----------------------------------------------------------------------------

    def drop(self, error: Exception, oldest_error: Exception | None = None) -> None:
        """Closes the socket at once and fails every call in flight: their replies, if any
        still come, can no longer be matched to them."""
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._outgoing.clear()
        self._unwritten_calls = 0
        self.pending_commands = 0
        first = True
        while self._in_flight:
            call = self._in_flight.popleft()
            if not call.future.done():
                call.future.set_exception(oldest_error if first and oldest_error else error)
            first = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def close(self, timeout_seconds: float) -> None:
        """Lets the calls in flight get their replies (for up to timeout_seconds), then closes
        the socket; whatever is still unanswered then fails with ConnectionError."""
        if self._in_flight and not self.closed:
            self._drained = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), timeout_seconds)
        if not self.closed:
            self.drop(RedisConnectionError("connection to Redis closed"))
        if self._transport is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.lost), timeout_seconds)


class PipelinedRedis:
    """The hot path's Redis client: one lazily opened connection, reopened after a loss.

    `execute` runs one command and raises its error reply; `execute_many` sends its commands in
    one piece, in order, and returns each reply or error reply in place; `evalsha` runs a
    script, loading it first when Redis lost it (restarted, or SCRIPT FLUSH)."""

    def __init__(
        self,
        address: RedisAddress,
        *,
        timeout_seconds: float,
        pending_limit: int = PENDING_COMMANDS_LIMIT,
    ) -> None:
        self.address = address
        self.timeout_seconds = timeout_seconds
        self.pending_limit = pending_limit
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False
        # The hot state's generation, appended to every EVALSHA (storage/redis/generation.py);
        # None for a plain connection (tools, tests of this class).
        self.generation: HotStateGeneration | None = None
        # When set, each connection learns its Redis process's run id as it opens, and a
        # script is sent only to a process this generation trusts (HotStateGeneration.trusts).
        self.run_gate: HotStateGeneration | None = None

    @classmethod
    def from_url(
        cls, url: str, *, timeout_seconds: float, pending_limit: int = PENDING_COMMANDS_LIMIT
    ) -> PipelinedRedis:
        return cls(
            RedisAddress.from_url(url), timeout_seconds=timeout_seconds, pending_limit=pending_limit
        )

    @property
    def pending_commands(self) -> int:
        """Commands sent (or about to be) and not answered yet."""
        connection = self._connection
        return 0 if connection is None or connection.closed else connection.pending_commands

    async def execute(self, *arguments: Argument) -> Reply:
        (reply,) = await self.transmit((arguments,))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def execute_many(
        self, commands: Sequence[Command], stamps: list[str] | None = None
    ) -> list[Reply]:
        """`stamps`, when given: filled with the generation each command was last sent with
        (scripts carry it; '' without a generation): the one a script that succeeded ran under,
        which the generation in use may no longer be by the time its reply is read."""
        if not commands:
            return []
        if tracing.caller() is None:  # not in a traced call: no span (one context lookup)
            return await self._send(commands, stamps)
        scripts = _scripts_in(commands)
        if not scripts:
            return await self._send(commands, stamps)
        with tracing.redis_span(scripts, len(commands)):
            return await self._send(commands, stamps)

    async def transmit(self, commands: Sequence[Command]) -> list[Reply]:
        """Sends the commands as they are, in one piece, and returns their replies in order:
        the one place a command leaves this process (a cluster client routes here by slot)."""
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connected()
        gate = self.run_gate
        if gate is not None and not gate.trusts(connection.run) and _has_script(commands):
            await self._refused_unless_trusted_now(connection, gate)
        replies = await connection.send(commands)
        if gate is not None and ReadOnlyError in map(type, replies):
            # A primary demoted under our connection (a failover, or one on its way back to
            # being a primary with a replica's older copy): the guardian looks at once.
            gate.lost.set()
        return replies

    async def _refused_unless_trusted_now(
        self, connection: _Connection, gate: HotStateGeneration
    ) -> None:
        """Raises UntrustedRedis unless the connection's run, read again (once for each trusted
        set the gate adopts), is trusted: the guardian may have adopted a generation built on
        what this connection's Redis is now."""
        trusted = gate.trusted_run_ids
        if trusted:
            if connection.reading is None or connection.reading[0] is not trusted:
                read = asyncio.ensure_future(_run_of_connection(connection))
                read.add_done_callback(_retrieve_error)
                connection.reading = (trusted, read)
            # Shielded: one caller giving up does not cancel the read the others wait for.
            connection.run = await asyncio.shield(connection.reading[1])
            if gate.trusts(connection.run):
                return
        gate.lost.set()  # the guardian looks at once
        raise UntrustedRedis(
            f"Redis at {self.address} (run {connection.run}) is not one the hot state was built on"
        )

    def topology_suspect(self) -> None:
        """A primary did not answer a command sent to it directly (`primaries`): a cluster
        client looks at its slot map again; nothing for a single node."""

    async def primaries(self) -> list[PipelinedRedis]:
        """One plain connection (no generation) per Redis primary, for what runs on every
        node rather than by key: SCAN, DBSIZE, INFO, SCRIPT LOAD. A single node: itself."""
        return [self]

    async def _send(
        self, commands: Sequence[Command], stamps: list[str] | None = None
    ) -> list[Reply]:
        """The commands, each script with the hot state's generation after its arguments."""
        generation = self.generation
        if generation is None:
            if stamps is not None:
                stamps[:] = [""] * len(commands)
            return await self.transmit(commands)
        value = generation.value
        if stamps is not None:
            stamps[:] = [value] * len(commands)
        replies = await self.transmit(_stamped(commands, value))
        # Scripts that refused their slots did nothing: sending them again (with the newer
        # generation adopted, then with their unused slots marked) is safe. Twice at most.
        for _ in range(2):
            refused = [number for number, reply in enumerate(replies) if refused_slot(reply)]
            if not refused or not await generation.resolve(
                self, [replies[number] for number in refused]
            ):
                break
            value = generation.value
            again = _stamped([commands[number] for number in refused], value)
            for number, reply in zip(refused, await self.execute_many_plain(again), strict=True):
                replies[number] = reply
                if stamps is not None:
                    stamps[number] = value
        return replies

    async def execute_many_plain(self, commands: Sequence[Command]) -> list[Reply]:
        """execute_many without the generation: the commands as they are."""
        return await self.transmit(commands)

    async def evalsha(
        self, script: Script, keys: Sequence[str], arguments: Sequence[Argument]
    ) -> Reply:
        command = ("EVALSHA", script.sha, len(keys), *keys, *arguments)
        (reply,) = await self.execute_many((command,))
        if isinstance(reply, NoScriptError):
            # Redis restarted (or SCRIPT FLUSH) since the scripts were loaded: load and retry
            # once. EVALSHA refused it without running anything, so the retry is safe.
            await self.load_script(script)
            (reply,) = await self.execute_many((command,))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def load_script(self, script: Script) -> None:
        """SCRIPT LOAD on this node (a cluster client loads it on every primary)."""
        await self.execute("SCRIPT", "LOAD", script.source)

    async def aclose(self) -> None:
        """Answers what is in flight (within the timeout), then closes; later calls fail."""
        self._closed = True
        if self._connecting is not None and not self._connecting.done():
            # Not cancelled (its waiters would see CancelledError as if they were cancelled):
            # it ends within the timeout, and seeing the client closed fails them.
            with contextlib.suppress(RedisError):
                await asyncio.shield(self._connecting)
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close(self.timeout_seconds)

    async def _connected(self) -> _Connection:
        """The open connection; the calls that arrive while it opens share one attempt."""
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
            self._connecting.add_done_callback(_retrieve_error)
        # Shielded: a caller that gives up does not cancel the attempt the others wait for.
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self.address

        def protocol() -> _Connection:
            return _Connection(self.timeout_seconds, self.pending_limit)

        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self.timeout_seconds):
                if address.unix_socket_path:
                    _, connection = await loop.create_unix_connection(
                        protocol, address.unix_socket_path
                    )
                else:
                    # asyncio sets TCP_NODELAY on TCP sockets itself.
                    _, connection = await loop.create_connection(
                        protocol, address.host, address.port
                    )
                login = address.login_commands()
                if login:
                    replies = await connection.send(login)
                    for command, reply in zip(login, replies, strict=True):
                        if isinstance(reply, ResponseError):
                            raise RedisConnectionError(f"Redis refused {command[0]!r}: {reply}")
                if self.run_gate is not None:
                    connection.run = await _run_of_connection(connection)
        except (OSError, TimeoutError, RedisError) as error:
            if connection is not None:
                connection.drop(RedisConnectionError("login failed"))
            if isinstance(error, RedisError):
                raise
            raise RedisConnectionError(
                f"cannot connect to Redis at {address}: {type(error).__name__} {error}"
            ) from error
        if self._closed:
            connection.drop(RedisConnectionError("the Redis client is closed"))
            raise RedisConnectionError("the Redis client is closed")
        self._connection = connection
        return connection


async def _run_of_connection(connection: _Connection) -> str:
    server, replication = await connection.send(list(RUN_COMMANDS))
    return run_of(server, replication).text()


def _has_script(commands: Sequence[Command]) -> bool:
    return any(command[0] == "EVALSHA" for command in commands)


def _stamped(commands: Sequence[Command], generation: str) -> list[Command]:
    """The commands with `generation` after every script's arguments (lua/_generation.lua)."""
    return [(*command, generation) if command[0] == "EVALSHA" else command for command in commands]


def _retrieve_error(task: asyncio.Future[Any]) -> None:
    """Marks a failed attempt's error as seen even when every caller had given up waiting."""
    if not task.cancelled():
        task.exception()
