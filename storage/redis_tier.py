"""Redis tier: one key per chunk, header and payload in one value.

Sizing and eviction belong to Redis: run it with ``maxmemory`` set and
``maxmemory-policy allkeys-lru`` so a full server drops the least recently used chunks
instead of refusing writes. Chunks may also expire after ``ttl_s``. Several vLLM
instances (and the kvshare daemon) can share one server: keys are content-addressed,
so concurrent writers of a key write identical values.

Writes, ``contains`` and deletes are pipelined (``transaction=False``); reads are not
(see ``RedisTier._get``).

Failure behaviour: connection and socket timeouts are short and redis-py's retries are
off, so a dead server costs one refused connection (or one timeout) per call, which
``Tier`` turns into misses. The pool reconnects by itself once the server is back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvshare.storage.chunk import KVChunk
from kvshare.storage.codec import ChunkCodec, ChunkCorruptError
from kvshare.storage.keys import KEY_BYTES, ChunkKey
from kvshare.storage.tier import ChunkCheck, Tier

logger = logging.getLogger(__name__)


class RedisTier(Tier):
    """Chunks in Redis under ``key_prefix + key``. Capacity is the server's ``maxmemory``.

    Args:
        url: ``redis://host:port/db`` or ``unix://path``.
        codec: encodes the values (``build_store``: the config's ``redis_compression``).
        ttl_s: expire chunks after this many seconds; 0 keeps them until evicted.
        max_connections: pool size; callers beyond it wait up to ``pool_timeout_s``.
        pipeline_bytes: a write pipeline is sent once it holds this many value bytes.
        socket_timeout_s: per-command read/write timeout; a 6 MB chunk takes ~5 ms locally.
        connect_timeout_s: TCP connect timeout.
    """

    failures = (redis.RedisError, OSError)

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
        self._pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout_s,
            socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = redis.Redis(connection_pool=self._pool)
        self._stats.chunks = -1

    def _name(self, key: ChunkKey) -> bytes:
        return self.key_prefix + key

    def _put(self, chunks: Sequence[KVChunk]) -> list[bool]:
        """SETs in pipelines of about ``pipeline_bytes``: few round trips for small chunks,
        and for large ones no more than one pipeline's encoded values held at once."""
        replies: list = []
        pipe = self._client.pipeline(transaction=False)
        queued = 0
        for chunk in chunks:
            value = self.codec.encode(chunk)
            pipe.set(self._name(chunk.key), value, ex=self.ttl_s or None)
            queued += len(value)
            if queued >= self.pipeline_bytes:
                replies += pipe.execute(raise_on_error=False)
                queued = 0
        if len(pipe):
            replies += pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):  # e.g. OOM with maxmemory-policy noeviction
                self._record_failure("put", reply)
        return [reply is True for reply in replies]

    def _get(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        # One GET per chunk, not a pipeline: chunks are megabytes, so a round trip is
        # noise next to the transfer, while a pipelined reply set is buffered whole in
        # Redis's output buffer and in redis-py's reader (memory grows with the batch, and
        # pipelined GETs of 6 MB values measured 10-20% slower than single GETs).
        found = []
        for key in keys:
            value = self._client.get(self._name(key))
            found.append(None if value is None else self._decode(key, value)[0])
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
                self._client.delete(self._name(key))
            except self.failures:
                pass  # dropping it is only tidiness; the next get verifies again
            return None, str(exc)

    def _keys(self) -> Iterator[ChunkKey]:
        """SCAN for this tier's prefix (other data may share the server)."""
        pattern = _glob_escape(self.key_prefix) + b"*"
        for name in self._client.scan_iter(match=pattern, count=1000):
            if len(name) == len(self.key_prefix) + KEY_BYTES:
                yield name[len(self.key_prefix):]

    def _check(self, keys: Sequence[ChunkKey]) -> list[ChunkCheck]:
        checks = []
        for key in keys:
            value = self._client.get(self._name(key))
            damage = "" if value is None else self._decode(key, value)[1]
            checks.append(ChunkCheck(key, held=value is not None, damage=damage))
        return checks

    def _contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._name(key))
        return [bool(n) for n in pipe.execute()]

    def _delete(self, keys: Sequence[ChunkKey]) -> int:
        return int(self._client.delete(*(self._name(key) for key in keys)))

    def _refresh_stats(self) -> None:
        """Server-wide figures from INFO (the server may hold other data too)."""
        try:
            memory = self._client.info("memory")
            evicted = self._client.info("stats")["evicted_keys"]
        except self.failures:
            return  # keep the last known figures; get/put report the failure
        with self._lock:
            self._stats.bytes_used = int(memory["used_memory"])
            self._stats.capacity_bytes = int(memory["maxmemory"]) or None
            self._stats.evictions = int(evicted)

    def close(self) -> None:
        self._pool.disconnect()


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` with Redis glob metacharacters escaped, for a literal prefix match."""
    return bytes(b for c in raw for b in ((92, c) if c in b"*?[]\\" else (c,)))
