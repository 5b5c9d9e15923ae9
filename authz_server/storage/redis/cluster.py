"""PipelinedRedis routed by slot over a Redis Cluster: one plain PipelinedRedis per primary.

Why not redis-py's cluster client on the hot path: its pipeline costs ~200 µs of client CPU per
Authorize batch against ~10 µs for PipelinedRedis (loadtest/RESULTS.md, "Redis clients for
Cluster"). So the commands still leave through PipelinedRedis connections, one per primary, and
only the topology comes from redis-py: `RedisCluster`'s nodes manager discovers the nodes, keeps
the slot map and refreshes it (no CLUSTER SLOTS parsing here), and `redis.crc.key_slot` gives a
key's slot.

Routing (`transmit`), for the commands of one call:
- a command goes to the primary of its first key's slot (EVALSHA/EVAL: the first key after
  numkeys; any other command: its first argument). Keyless commands (SCAN, INFO, SCRIPT...)
  are refused: they belong on every node, through `primaries()`;
- callers rely on the commands of one call running in the order given (a script, then the
  sweeper's index entry that must land after it; SETs, then a GET that must see them). So the
  commands are cut into consecutive runs bound for one node, and the runs are sent one after
  another, each awaited before the next; replies come back in the original order. A call whose
  commands all go to one node is still one round trip (one run), as on a single node.

Redirections (Redis did not run the command: resending is safe):
- MOVED: the slot's owner is updated in redis-py's map (and the whole map refreshed in the
  background), the command is sent again to the node named;
- ASK: ASKING and the command go together to the node named, adjacent on its connection, once;
  except a script (EVALSHA/EVAL/FCALL): its ASK stays its reply (UNAVAILABLE; the call is
  retried). ASK means the slot is being migrated, and with ASKING the importing node runs the
  script on whatever part of the slot has arrived: it reads the keys the script did not declare
  (quota hashes, the slot's generation marker...) as missing when they have not moved yet, and
  decides on that (hold_restore.lua answered "nothing to restore" for an approved hold). The
  source node is safe: Redis refuses a script's access there to a key that has left;
- TRYAGAIN (a multi-key command during a migration): a few short retries, then the error stays;
- CLUSTERDOWN and any other error reply: left in place (the service answers UNAVAILABLE).
A command is redirected at most MAX_REDIRECTIONS times. A redirected command runs after the
commands that followed it in its run on the same node (those already ran and cannot be
undone), but before every later run.

Never twice: a lost connection or a timeout fails the call with ConnectionError/TimeoutError
exactly as PipelinedRedis does (Redis may have run the command; the till retries with its
idempotency key), and the commands of later runs are not sent. It also refreshes the slot map
(single flight, at most once per REFRESH_INTERVAL_SECONDS), so once the cluster has promoted a
replica the next calls reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from urllib.parse import urlsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.cluster import PRIMARY
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from authz_server.storage.redis.pipelined import (
    PENDING_COMMANDS_LIMIT,
    Argument,
    Command,
    PipelinedRedis,
    RedisAddress,
    Reply,
    Script,
)

log = logging.getLogger(__name__)

CLUSTER_SCHEME = "redis+cluster"
# Redirections followed per command: a slot moves once per reshard step, so more than a few in a
# row means the nodes disagree; the error reply is then left to the caller (UNAVAILABLE).
MAX_REDIRECTIONS = 5
TRYAGAIN_ATTEMPTS = 3
TRYAGAIN_DELAY_SECONDS = 0.02
# At most one slot map refresh per this interval: every call for a dead primary's slots fails
# until the cluster promotes a replica (~1-2 s node timeout), and each failure asks for one.
REFRESH_INTERVAL_SECONDS = 0.1
# The commands that name no key: they run on every primary (primaries()), never by slot.
_KEYLESS = frozenset(
    {
        "SCAN", "DBSIZE", "INFO", "PING", "SCRIPT", "FLUSHALL", "FLUSHDB", "KEYS", "RANDOMKEY",
        "CLUSTER", "CONFIG", "CLIENT", "COMMAND", "TIME", "ROLE", "LASTSAVE", "MEMORY", "SLOWLOG",
        "LATENCY", "DEBUG", "WAIT", "READONLY", "READWRITE", "ASKING", "AUTH", "SELECT", "HELLO",
        "MULTI", "EXEC", "DISCARD", "FUNCTION", "SAVE", "BGSAVE", "BGREWRITEAOF", "SHUTDOWN",
    }
)  # fmt: skip


_SCRIPT_COMMANDS = frozenset({"EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL", "FCALL_RO"})


def is_cluster_url(url: str) -> bool:
    """Whether `url` names a Redis Cluster (redis+cluster://host:port[,host:port...])."""
    return url.startswith(f"{CLUSTER_SCHEME}://")


def _seeds(url: str) -> tuple[list[tuple[str, int]], str, str]:
    """(seed addresses, username, password) of a redis+cluster:// URL."""
    if not is_cluster_url(url):
        raise ValueError(f"not a {CLUSTER_SCHEME}:// URL: {url!r}")
    # urlsplit refuses several host:port pairs: the login part is cut off by hand, then read by
    # redis-py's own parse_url, so it means what it means in a redis:// URL.
    location = urlsplit(url).netloc
    login, _, hosts = location.rpartition("@")
    options = parse_url(f"redis://{login}@localhost") if login else {}
    username, password = str(options.get("username") or ""), str(options.get("password") or "")
    seeds: list[tuple[str, int]] = []
    for address in hosts.split(","):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a {CLUSTER_SCHEME}:// seed must be host:port, got {address!r}")
        seeds.append((host.strip("[]"), int(port)))
    return seeds, username, password


def _text(argument: Argument) -> bytes:
    if isinstance(argument, bytes):
        return argument
    return str(argument).encode()


def slot_of_command(command: Command) -> int:
    """The slot of a command's first key; ValueError for a command that names none."""
    name = str(command[0], "utf-8") if isinstance(command[0], bytes) else str(command[0])
    name = name.upper()
    if name in _SCRIPT_COMMANDS:
        if len(command) > 3 and int(command[2]) > 0:
            return int(key_slot(_text(command[3])))
    elif name not in _KEYLESS and len(command) > 1:
        return int(key_slot(_text(command[1])))
    raise ValueError(
        f"{name} names no key, so no node of a Redis Cluster is its own: send it to every "
        "node through primaries() instead"
    )


class ClusterPipelinedRedis(PipelinedRedis):
    """PipelinedRedis over a Redis Cluster: commands routed by slot to one PipelinedRedis per
    primary; the topology kept by redis-py's RedisCluster."""

    def __init__(
        self,
        seeds: Sequence[tuple[str, int]],
        *,
        username: str = "",
        password: str = "",
        timeout_seconds: float,
        pending_limit: int = PENDING_COMMANDS_LIMIT,
    ) -> None:
        if not seeds:
            raise ValueError("a Redis Cluster needs at least one seed node")
        host, port = seeds[0]
        # The base class's own connection is never opened (transmit is routed); its address
        # is kept for logs and for the login every node connection uses.
        super().__init__(
            RedisAddress(host=host, port=port, username=username, password=password),
            timeout_seconds=timeout_seconds,
            pending_limit=pending_limit,
        )
        # Topology only: redis-py's own connections serve CLUSTER SLOTS, never the hot path.
        self.topology = RedisCluster(
            startup_nodes=[ClusterNode(seed_host, seed_port) for seed_host, seed_port in seeds],
            username=username or None,
            password=password or None,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            # A shard without a primary stops its own slots only (deploy/redis/CLUSTER.md).
            require_full_coverage=False,
        )
        self._nodes: dict[str, PipelinedRedis] = {}
        self._started: asyncio.Task[None] | None = None
        self._mapped = False  # the first slot map is in
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = -REFRESH_INTERVAL_SECONDS
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(
        cls, url: str, *, timeout_seconds: float, pending_limit: int = PENDING_COMMANDS_LIMIT
    ) -> ClusterPipelinedRedis:
        """redis+cluster://[[user]:password@]host:port[,host:port...] (seed nodes)."""
        seeds, username, password = _seeds(url)
        return cls(
            seeds,
            username=username,
            password=password,
            timeout_seconds=timeout_seconds,
            pending_limit=pending_limit,
        )

    # --- topology ---------------------------------------------------------------------------

    async def _ready(self) -> None:
        """The first slot map, fetched once; calls arriving meanwhile wait for the same one."""
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        if self._started is None or (self._started.done() and not self._mapped):
            self._started = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        try:
            await self.topology.initialize()
        except RedisError:
            raise
        except Exception as error:  # RedisClusterException and the like: still UNAVAILABLE
            raise RedisConnectionError(f"cannot reach the Redis Cluster: {error}") from error
        self._last_refresh = time.monotonic()
        self._mapped = True

    def topology_suspect(self) -> None:
        self.refresh_soon()

    def refresh_soon(self) -> None:
        """Refreshes the slot map in the background: single flight, at most once per
        REFRESH_INTERVAL_SECONDS (every failing call asks for one)."""
        if self._closed or (self._refreshing is not None and not self._refreshing.done()):
            return
        if time.monotonic() - self._last_refresh < REFRESH_INTERVAL_SECONDS:
            return
        self._last_refresh = time.monotonic()
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def refresh(self) -> None:
        """Refreshes the slot map now (tests, tools); the calls keep routing meanwhile."""
        self.refresh_soon()
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        try:
            await self.topology.nodes_manager.initialize()
        except Exception as error:  # no node reachable: the calls keep failing and ask again
            log.warning("Redis Cluster slot map refresh failed: %s", error)
            return
        finally:
            self._last_refresh = time.monotonic()
        # Connections to nodes that are no longer primaries: closed (a replica refuses writes).
        current = {node.name for node in self._primary_nodes()}
        for name in [name for name in self._nodes if name not in current]:
            self._spawn(self._nodes.pop(name).aclose())

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _primary_nodes(self) -> list[ClusterNode]:
        return list(self.topology.nodes_manager.get_nodes_by_server_type(PRIMARY))

    def _connection_to(self, name: str) -> PipelinedRedis:
        """The plain PipelinedRedis of node host:port, made on first use."""
        node = self._nodes.get(name)
        if node is None:
            host, _, port = name.rpartition(":")
            address = self.address
            node = PipelinedRedis(
                RedisAddress(
                    host=host, port=int(port), username=address.username, password=address.password
                ),
                timeout_seconds=self.timeout_seconds,
                pending_limit=self.pending_limit,
            )
            # Each primary's scripts pass the router's run gate (pipelined.UntrustedRedis): a
            # replica promoted is a new node, so it is asked its run id before any script.
            node.run_gate = self.run_gate
            self._nodes[name] = node
        return node

    def _owner(self, slot: int) -> str:
        try:
            return str(self.topology.nodes_manager.get_node_from_slot(slot).name)
        except SlotNotCoveredError as error:
            # No primary in the map (a shard lost with its replicas): a RedisError, so the
            # service answers UNAVAILABLE; nothing was sent. Maybe the map is only old.
            self.refresh_soon()
            raise ClusterDownError(f"slot {slot} is served by no known primary") from error

    # --- routing ----------------------------------------------------------------------------

    async def transmit(self, commands: Sequence[Command]) -> list[Reply]:
        """The commands routed by slot, in order: consecutive commands bound for one node go in
        one piece, and each such run is answered before the next is sent (see the module)."""
        if not self._mapped or self._closed:
            await self._ready()
        slots = [slot_of_command(command) for command in commands]
        owners = [self._owner(slot) for slot in slots]
        if len(set(owners)) == 1:  # the common case: one node, one round trip
            return await self._run(owners[0], commands)
        replies: list[Reply] = []
        start = 0
        while start < len(commands):
            end = start + 1
            while end < len(commands) and owners[end] == owners[start]:
                end += 1
            replies.extend(await self._run(owners[start], commands[start:end]))
            start = end
        return replies

    async def _run(self, name: str, commands: Sequence[Command]) -> list[Reply]:
        """One run on one node, its redirected commands followed before returning."""
        try:
            replies = await self._connection_to(name).transmit(commands)
        except (RedisConnectionError, TimeoutError):
            # Redis may have run them: never sent again. The node may be gone: find out.
            self.refresh_soon()
            raise
        for number, reply in enumerate(replies):
            if isinstance(reply, ResponseError) and str(reply).startswith(
                ("MOVED ", "ASK ", "TRYAGAIN")
            ):
                replies[number] = await self._redirected(commands[number], reply)
        return replies

    async def _redirected(self, command: Command, reply: Reply) -> Reply:
        """Follows MOVED/ASK/TRYAGAIN for one command that Redis refused without running it."""
        tries_left = TRYAGAIN_ATTEMPTS
        for _ in range(MAX_REDIRECTIONS):
            if not isinstance(reply, ResponseError):
                return reply
            message = str(reply)
            code, _, rest = message.partition(" ")
            try:
                if code == "MOVED":
                    moved = MovedError(rest)
                    # This slot now, the whole map in the background (a reshard or a failover
                    # moves many slots at once).
                    with contextlib.suppress(KeyError):  # a slot the map lacks: refreshed below
                        await self.topology.nodes_manager.move_slot(moved)
                    self.refresh_soon()
                    (reply,) = await self._connection_to(_name(moved)).transmit((command,))
                elif code == "ASK" and _is_script(command):
                    return reply  # never run on a half-moved slot (see the module)
                elif code == "ASK":
                    # ASKING lets the importing node take the next command on that connection:
                    # both in one piece, so nothing of another call comes between them.
                    target = _name(AskError(rest))
                    _, reply = await self._connection_to(target).transmit((("ASKING",), command))
                elif code == "TRYAGAIN" and tries_left > 0:
                    tries_left -= 1
                    await asyncio.sleep(TRYAGAIN_DELAY_SECONDS)
                    (reply,) = await self._connection_to(
                        self._owner(slot_of_command(command))
                    ).transmit((command,))
                else:
                    return reply
            except (RedisConnectionError, TimeoutError):
                self.refresh_soon()
                raise
        return reply

    # --- what runs on every primary ---------------------------------------------------------

    async def primaries(self) -> list[PipelinedRedis]:
        """One plain PipelinedRedis (no generation) per current primary."""
        await self._ready()
        return [self._connection_to(node.name) for node in self._primary_nodes()]

    async def load_script(self, script: Script) -> None:
        """SCRIPT LOAD on every primary: each node has its own script cache, and a promoted
        replica or a new node starts without the scripts. Every primary is tried; the first
        failure is raised after."""
        results = await asyncio.gather(
            *(node.execute("SCRIPT", "LOAD", script.source) for node in await self.primaries()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    @property
    def pending_commands(self) -> int:
        return sum(node.pending_commands for node in self._nodes.values())

    async def aclose(self) -> None:
        """Every node connection (answering what is in flight first), then redis-py's client."""
        self._closed = True
        nodes, self._nodes = list(self._nodes.values()), {}
        await asyncio.gather(*(node.aclose() for node in nodes), return_exceptions=True)
        for task in [*self._background, self._refreshing, self._started]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.topology.aclose()


def _is_script(command: Command) -> bool:
    name = str(command[0], "utf-8") if isinstance(command[0], bytes) else str(command[0])
    return name.upper() in _SCRIPT_COMMANDS


def _name(redirection: AskError) -> str:
    host, port = redirection.node_addr
    return f"{host}:{port}"
