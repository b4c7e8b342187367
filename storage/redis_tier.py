"""Redis tier: one key per chunk, header and payload in one value; one server or a
Redis Cluster.

Sizing and eviction belong to Redis: run it with ``maxmemory`` set and
``maxmemory-policy allkeys-lru`` so a full server drops the least recently used chunks
instead of refusing writes. Chunks may also expire after ``ttl_s``. Several vLLM
instances (and the kvshare daemon) can share one server or cluster: keys are
content-addressed, so concurrent writers of a key write identical values.

Topology. ``redis://`` and ``unix://`` name one server; ``redis+cluster://`` a Redis
Cluster, whose 16384 hash slots are spread over its masters. Chunk keys carry no hash
tag, so the chunks of one prompt land on many masters: a long prompt is read from all
of them at once, and a lost master costs every prompt a few chunks (recomputed) rather
than some prompts all of theirs. Every command the tier sends names one key, or is
grouped per master (pipelines, see ``_per_master``), so none crosses slots; SCAN and
INFO are sent to every master and summed.

Writes, ``contains`` and deletes are pipelined (``transaction=False``), one pipeline per
master; reads are not (see ``RedisTier._get``).

Failure behaviour: connection and socket timeouts are short and redis-py's retries are
off. A master that fails costs one refused connection (or one timeout) per call and
reads as misses for its keys only; the other masters keep serving. ``Tier`` counts one
error per call that met a failure. Connections are re-made once a server is back; the
cluster client is built at first use, so the tier starts while the cluster is down.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.retry import Retry

from kvshare.storage.chunk import KVChunk
from kvshare.storage.codec import ChunkCodec, ChunkCorruptError
from kvshare.storage.keys import KEY_BYTES, ChunkKey
from kvshare.storage.redis_url import is_cluster_url, parse_cluster_url
from kvshare.storage.tier import ChunkCheck, Tier

logger = logging.getLogger(__name__)

Client = redis.Redis | RedisCluster
"""What runs the tier's keyed commands: a server's client, or the cluster's (it routes
each key to its slot's master)."""


class RedisTier(Tier):
    """Chunks in Redis under ``key_prefix + key``. Capacity is the servers' ``maxmemory``.

    Args:
        url: ``redis://host:port/db``, ``unix://path`` or
            ``redis+cluster://host:port[,host:port...]`` (see ``kvshare.storage.redis_url``).
        codec: encodes the values (``build_store``: the config's ``redis_compression``).
        ttl_s: expire chunks after this many seconds; 0 keeps them until evicted.
        max_connections: pool size (one server); callers beyond it wait up to
            ``pool_timeout_s``. A cluster keeps one unbounded pool per master: its
            callers are the few threads of one process.
        pipeline_bytes: a write pipeline is sent once it holds this many value bytes.
        socket_timeout_s: per-command read/write timeout; a 6 MB chunk takes ~5 ms locally.
        connect_timeout_s: TCP connect timeout.
    """

    failures = (redis.RedisError, RedisClusterException, OSError)

    def __init__(self, url: str, codec: ChunkCodec, ttl_s: int = 0,
                 key_prefix: bytes = b"kvshare:chunk:", max_connections: int = 8,
                 pipeline_bytes: int = 4 << 20,
                 socket_timeout_s: float = 2.0, connect_timeout_s: float = 0.5,
                 pool_timeout_s: float = 2.0, name: str = "redis") -> None:
        if ttl_s < 0:
            raise ValueError(f"RedisTier ttl_s={ttl_s} must be >= 0 (0 = no expiry)")
        super().__init__(name, capacity_bytes=None)
        self.codec = codec
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self.pipeline_bytes = pipeline_bytes
        timeouts = {"socket_timeout": socket_timeout_s,
                    "socket_connect_timeout": connect_timeout_s}
        self._servers: _Servers = (
            _Cluster(url, **timeouts) if is_cluster_url(url)
            else _Server(url, max_connections, pool_timeout_s, **timeouts))
        self._stats.chunks = -1  # until a server has answered DBSIZE

    @property
    def cluster(self) -> bool:
        """Whether the tier talks to a Redis Cluster."""
        return isinstance(self._servers, _Cluster)

    def _name(self, key: ChunkKey) -> bytes:
        return self.key_prefix + key

    def _per_master(self, verb: str, names: Sequence[bytes],
                    run: Callable[[Client, list[int]], None]) -> None:
        """``run(client, indices)`` once per master, for the indices of ``names`` whose
        slots it serves. A master that fails leaves its results at the caller's defaults
        (misses, not stored) and the others carry on; the call counts one error.
        A cluster that answers CLUSTERDOWN refuses every slot: the call ends there."""
        failed: list[BaseException] = []
        client = self._servers.client()
        for indices in self._servers.by_master(names):
            try:
                run(client, indices)
            except ClusterDownError:
                raise
            except self.failures as exc:
                failed.append(exc)
        if failed:
            self._record_failure(verb, failed[0])

    def _put(self, chunks: Sequence[KVChunk]) -> list[bool]:
        """SETs in pipelines of about ``pipeline_bytes``: few round trips for small chunks,
        and for large ones no more than one pipeline's encoded values held at once."""
        stored = [False] * len(chunks)

        def put(client: Client, indices: list[int]) -> None:
            pipe = client.pipeline(transaction=False)
            queued: list[int] = []
            size = 0
            for i in indices:
                value = self.codec.encode(chunks[i])
                pipe.set(self._name(chunks[i].key), value, ex=self.ttl_s or None)
                queued.append(i)
                size += len(value)
                if size >= self.pipeline_bytes or i == indices[-1]:
                    for j, reply in zip(queued, pipe.execute(raise_on_error=False)):
                        if isinstance(reply, Exception):  # e.g. OOM under noeviction
                            self._record_failure("put", reply)
                        stored[j] = reply is True
                    queued, size = [], 0

        self._per_master("put", [self._name(c.key) for c in chunks], put)
        return stored

    def _get(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        # One GET per chunk, not a pipeline: chunks are megabytes, so a round trip is
        # noise next to the transfer, while a pipelined reply set is buffered whole in
        # Redis's output buffer and in redis-py's reader (memory grows with the batch, and
        # pipelined GETs of 6 MB values measured 10-20% slower than single GETs).
        found: list[KVChunk | None] = [None] * len(keys)

        def get(client: Client, indices: list[int]) -> None:
            for i in indices:
                value = client.get(self._name(keys[i]))
                found[i] = None if value is None else self._decode(keys[i], value)[0]

        self._per_master("get", [self._name(k) for k in keys], get)
        return found

    def _decode(self, key: ChunkKey, value: bytes) -> tuple[KVChunk | None, str]:
        """The value's chunk and ""; or None and why it is damaged (the key is deleted)."""
        try:
            chunk = self.codec.decode(value)
            if chunk.key != key:
                raise ChunkCorruptError(f"value holds chunk {chunk.key.hex()}")
            return chunk, ""
        except ChunkCorruptError as exc:
            logger.warning("kvshare %s tier: dropping corrupt chunk %s: %s",
                           self.name, key.hex(), exc)
            with self._lock:
                self._stats.corrupt += 1
            try:
                self._servers.client().delete(self._name(key))
            except self.failures:
                pass  # dropping it is only tidiness; the next get verifies again
            return None, str(exc)

    def _keys(self) -> Iterator[ChunkKey]:
        """SCAN every master for this tier's prefix (other data may share the servers).
        A master that fails is skipped (its keys are unreadable anyway) and counted."""
        pattern = _glob_escape(self.key_prefix) + b"*"
        failed: list[BaseException] = []
        for master in self._servers.masters():
            try:
                for name in master.scan_iter(match=pattern, count=1000):
                    if len(name) == len(self.key_prefix) + KEY_BYTES:
                        yield name[len(self.key_prefix):]
            except self.failures as exc:
                failed.append(exc)
        if failed:
            self._record_failure("keys", failed[0])

    def _check(self, keys: Sequence[ChunkKey]) -> list[ChunkCheck]:
        checks = [ChunkCheck(key, held=False) for key in keys]

        def check(client: Client, indices: list[int]) -> None:
            for i in indices:
                value = client.get(self._name(keys[i]))
                damage = "" if value is None else self._decode(keys[i], value)[1]
                checks[i] = ChunkCheck(keys[i], held=value is not None, damage=damage)

        self._per_master("check", [self._name(k) for k in keys], check)
        return checks

    def _contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        held = [False] * len(keys)

        def contains(client: Client, indices: list[int]) -> None:
            pipe = client.pipeline(transaction=False)
            for i in indices:
                pipe.exists(self._name(keys[i]))
            for i, count in zip(indices, pipe.execute()):
                held[i] = bool(count)

        self._per_master("contains", [self._name(k) for k in keys], contains)
        return held

    def _delete(self, keys: Sequence[ChunkKey]) -> int:
        deleted = 0

        def delete(client: Client, indices: list[int]) -> None:
            nonlocal deleted
            pipe = client.pipeline(transaction=False)
            for i in indices:  # one DEL per key: a multi-key DEL must not cross slots
                pipe.delete(self._name(keys[i]))
            deleted += sum(pipe.execute())

        self._per_master("delete", [self._name(k) for k in keys], delete)
        return deleted

    def _refresh_stats(self) -> None:
        """Server-wide figures (the servers may hold other data too), summed over the
        masters that answer: bytes from INFO memory, keys from DBSIZE, evictions from
        INFO stats. Capacity is the sum of ``maxmemory``, None if any master has none.
        When no master answers, the last figures stay (get/put report the failure)."""
        figures = []
        try:
            for master in self._servers.masters():
                try:
                    memory = master.info("memory")
                    figures.append((int(memory["used_memory"]), int(memory["maxmemory"]),
                                    int(master.info("stats")["evicted_keys"]),
                                    int(master.dbsize())))
                except self.failures:
                    continue  # a lost master holds nothing the tier can read
        except self.failures:
            return  # no slot map: nothing reachable
        if not figures:
            return
        used, caps, evicted, keys = (list(column) for column in zip(*figures))
        with self._lock:
            self._stats.bytes_used = sum(used)
            self._stats.capacity_bytes = None if 0 in caps else sum(caps)
            self._stats.evictions = sum(evicted)
            self._stats.chunks = sum(keys)

    def close(self) -> None:
        self._servers.close()


class _Servers(ABC):
    """Where the tier's commands go: a client, its masters, and keys grouped by master."""

    @abstractmethod
    def client(self) -> Client: ...

    @abstractmethod
    def by_master(self, names: Sequence[bytes]) -> list[list[int]]:
        """Indices of ``names`` grouped by the master that serves each, in input order."""

    @abstractmethod
    def masters(self) -> list[redis.Redis]:
        """One client per master (for node-local commands: SCAN, INFO, DBSIZE)."""

    @abstractmethod
    def close(self) -> None: ...


class _Server(_Servers):
    """One server behind a blocking pool; connecting happens at the first command."""

    def __init__(self, url: str, max_connections: int, pool_timeout_s: float,
                 **timeouts: float) -> None:
        self._pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout_s,
            retry=Retry(NoBackoff(), 0), **timeouts)
        self._client = redis.Redis(connection_pool=self._pool)

    def client(self) -> redis.Redis:
        return self._client

    def by_master(self, names: Sequence[bytes]) -> list[list[int]]:
        return [list(range(len(names)))]

    def masters(self) -> list[redis.Redis]:
        return [self._client]

    def close(self) -> None:
        self._pool.disconnect()


class _Cluster(_Servers):
    """A Redis Cluster client built at first use (building it asks a startup node for
    the slot map, which fails while the cluster is down) and rebuilt after ``close``.

    Commands follow MOVED/ASK redirections and refresh the slot map when a master
    fails; nothing is retried (``Retry(NoBackoff(), 0)``), because a miss is cheaper
    than waiting. ``require_full_coverage=False``: the client starts and serves while a
    master (and its slots) is lost.
    """

    def __init__(self, url: str, **timeouts: float) -> None:
        parsed = parse_cluster_url(url)
        self._nodes = parsed.nodes
        self._options = {"username": parsed.username, "password": parsed.password,
                         **timeouts}
        self._lock = threading.Lock()
        self._client: RedisCluster | None = None

    def client(self) -> RedisCluster:
        with self._lock:
            if self._client is None:
                self._client = RedisCluster(
                    startup_nodes=[ClusterNode(host, port) for host, port in self._nodes],
                    retry=Retry(NoBackoff(), 0), require_full_coverage=False,
                    **self._options)
            return self._client

    def by_master(self, names: Sequence[bytes]) -> list[list[int]]:
        client = self.client()
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(client.get_node_from_key(name).name, []).append(i)
        return list(groups.values())

    def masters(self) -> list[redis.Redis]:
        client = self.client()
        return [client.get_redis_connection(node) for node in client.get_primaries()]

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` with Redis glob metacharacters escaped, for a literal prefix match."""
    return bytes(b for c in raw for b in ((92, c) if c in b"*?[]\\" else (c,)))
