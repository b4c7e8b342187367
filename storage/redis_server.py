"""Private ``redis-server`` subprocesses on free 127.0.0.1 ports: one server, or a
Redis Cluster of several masters.

Used by the tests and ``kvshare bench storage`` so that neither needs a server set up
beforehand. No data is persisted (``--save ""``, ``--appendonly no``): a killed server
comes back empty, exactly like a flushed cache. A cluster node keeps its cluster
config file (node id, slots, peers) across a restart, so it rejoins its cluster.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvshare.storage.redis_url import CLUSTER_SCHEME

CLUSTER_SLOTS = 16384


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_cluster_port(attempts: int = 200) -> int:
    """A free port P <= 55535 whose cluster bus port, P + 10000, is free too (a cluster
    node listens on both)."""
    for _ in range(attempts):
        with socket.socket() as sock, socket.socket() as bus:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port + 10000 > 65535:
                continue
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port pair (P, P + 10000) found in {attempts} attempts")


class RedisServer:
    """Start, kill and restart one redis-server; the port stays the same across restarts.

    Args:
        maxmemory_bytes: Redis ``maxmemory`` (0 = unlimited); evicts ``allkeys-lru``.
        executable: path or name of ``redis-server``.
        extra_args: more ``redis-server`` options (``--name value`` pairs).
        port: the port to listen on; default a free one.
    """

    def __init__(self, maxmemory_bytes: int = 0, executable: str = "redis-server",
                 extra_args: Sequence[str] = (), port: int | None = None) -> None:
        found = shutil.which(executable)
        if found is None:
            raise FileNotFoundError(
                f"{executable!r} not found; install it (Debian: apt-get install redis-server)")
        self.executable = found
        self.maxmemory_bytes = maxmemory_bytes
        self.extra_args = list(extra_args)
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="kvshare-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def directory(self) -> Path:
        """The server's working directory (its log, a cluster node's config file)."""
        return self._dir

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server and return once it answers PING (or raise naming why not)."""
        if self.running:
            return self
        log = self._dir / "redis.log"
        self._proc = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self._dir),
             "--logfile", str(log), "--maxmemory", str(self.maxmemory_bytes),
             "--maxmemory-policy", "allkeys-lru", *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        self._wait_for_ping(timeout_s, log)
        return self

    def _wait_for_ping(self, timeout_s: float, log: Path) -> None:
        assert self._proc is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2,
                             socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited with "
                        f"{self._proc.returncode}:\n{tail}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"redis-server on port {self.port} did not answer PING "
                                       f"within {timeout_s} s")
                try:  # pause between attempts, ending early if the server dies
                    self._proc.wait(timeout=0.005)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would; the port is reused by the next ``start``."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Kill the server and remove its directory."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisClusterServers:
    """A Redis Cluster of ``masters`` redis-servers on 127.0.0.1, no replicas.

    The hash slots are split into equal ranges, master ``i`` serving range ``i``. Nodes
    run with ``cluster-require-full-coverage no``, the setting a cache wants: while a
    master is down the others keep serving their slots (with the default, ``yes``, the
    whole cluster refuses commands once the loss is detected).

    Args:
        masters: number of masters (>= 1).
        maxmemory_bytes: ``maxmemory`` of each master (0 = unlimited), ``allkeys-lru``.
        node_timeout_ms: ``cluster-node-timeout``: how long a master may be unreachable
            before the others mark it failed.
    """

    def __init__(self, masters: int = 3, maxmemory_bytes: int = 0,
                 executable: str = "redis-server", node_timeout_ms: int = 2000) -> None:
        if masters < 1:
            raise ValueError(f"RedisClusterServers masters={masters} must be >= 1")
        self.servers = [
            RedisServer(maxmemory_bytes, executable, extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-require-full-coverage", "no"], port=free_cluster_port())
            for _ in range(masters)]
        bounds = [CLUSTER_SLOTS * i // masters for i in range(masters + 1)]
        self.slot_ranges = [range(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        """Slots master ``i`` serves."""

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every master as a startup node."""
        return CLUSTER_SCHEME + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    def master_of(self, name: bytes) -> int:
        """Index of the master that serves the key ``name``."""
        slot = redis.crc.key_slot(name)
        return next(i for i, slots in enumerate(self.slot_ranges) if slot in slots)

    def node_client(self, i: int) -> redis.Redis:
        """A plain client of master ``i`` alone (node-local commands: DBSIZE, SCAN, INFO)."""
        return redis.Redis(host="127.0.0.1", port=self.servers[i].port,
                           socket_connect_timeout=0.5, socket_timeout=2.0,
                           retry=Retry(NoBackoff(), 0))

    def start(self, timeout_s: float = 30.0) -> RedisClusterServers:
        """Start the masters that are not running; on the first start assign the slots
        and introduce the nodes (CLUSTER ADDSLOTS, CLUSTER MEET). Returns once every
        node reports ``cluster_state:ok`` with all slots assigned and every peer known."""
        deadline = time.monotonic() + timeout_s
        for server in self.servers:
            if not server.running:
                server.start(max(deadline - time.monotonic(), 0.1))
        clients = [self.node_client(i) for i in range(len(self.servers))]
        try:
            if all(int(client.cluster("info")["cluster_slots_assigned"]) == 0
                   for client in clients):  # a new cluster (restarts keep nodes.conf)
                for client, slots in zip(clients, self.slot_ranges):
                    client.execute_command("CLUSTER ADDSLOTS", *slots)
                for server in self.servers[1:]:
                    clients[0].execute_command("CLUSTER MEET", "127.0.0.1", server.port)
            self._wait_until_ok(clients, deadline)
        finally:
            for client in clients:
                client.close()
        return self

    def _wait_until_ok(self, clients: list[redis.Redis], deadline: float) -> None:
        """Poll CLUSTER INFO on every node until all agree the cluster is whole."""
        while True:
            infos = [client.cluster("info") for client in clients]
            if all(info["cluster_state"] == "ok"
                   and int(info["cluster_slots_assigned"]) == CLUSTER_SLOTS
                   and int(info["cluster_known_nodes"]) == len(clients) for info in infos):
                return
            for server in self.servers:
                if not server.running:
                    raise RuntimeError(f"cluster node on port {server.port} exited; log in "
                                       f"{server.directory}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster on ports {self.ports} not ok in time: "
                                   f"{[info['cluster_state'] for info in infos]}")
            time.sleep(0.02)  # gossip runs on the nodes' 100 ms cron; poll well inside it

    def kill(self, i: int | None = None) -> None:
        """SIGKILL master ``i`` (every master when None), as a crash would."""
        for server in self.servers if i is None else [self.servers[i]]:
            server.kill()

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> RedisClusterServers:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
