"""The interface every storage tier fills, and the stats it keeps.

A tier is a cache: a failing backend (Redis down, disk full, device out of memory) must
cost a miss, never an exception in the request path. ``Tier`` therefore wraps each
backend call: it times it, counts it, and turns the backend's failure exceptions
(``failures``) into "not stored" / "miss" results. Anything else is a bug and propagates.
Logging is edge-triggered (one warning when a tier starts failing, one line when it
recovers) so a dead Redis does not flood the log at request rate.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from kvshare.storage.chunk import KVChunk
from kvshare.storage.keys import ChunkKey

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class TierStats:
    """Counters of one tier since it was built. Chunk counts are chunks, not calls."""

    name: str
    capacity_bytes: int | None
    """Byte cap the tier evicts to stay under; None when the backend manages it (Redis)."""
    bytes_used: int = 0
    """Bytes held now (encoded size for disk and Redis, tensor size in memory)."""
    chunks: int = 0
    """Chunks held now; for Redis the keys on its servers (DBSIZE summed over masters;
    server-wide like ``bytes_used``); -1 until a backend has answered."""
    hits: int = 0
    misses: int = 0
    stored: int = 0
    """Chunks accepted by put (already-present chunks included)."""
    rejected: int = 0
    """Chunks put refused or failed to store (too large, I/O error, backend down)."""
    evictions: int = 0
    corrupt: int = 0
    """Chunks that failed verification on read and were dropped."""
    errors: int = 0
    """Backend failures (each turned into misses / not stored)."""
    put_calls: int = 0
    put_seconds: float = 0.0
    get_calls: int = 0
    get_seconds: float = 0.0
    healthy: bool = True
    """False after a backend failure until the next call succeeds."""
    last_error: str = ""

    @property
    def mean_put_ms(self) -> float:
        return 1e3 * self.put_seconds / self.put_calls if self.put_calls else 0.0

    @property
    def mean_get_ms(self) -> float:
        return 1e3 * self.get_seconds / self.get_calls if self.get_calls else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (CLI, daemon), with the mean latencies added."""
        return {**dataclasses.asdict(self), "mean_put_ms": self.mean_put_ms,
                "mean_get_ms": self.mean_get_ms}


@dataclass(frozen=True)
class ChunkCheck:
    """What a scrub found for one key of a tier (``Tier.check``)."""

    key: ChunkKey
    held: bool
    """The tier held the key when it was checked (False: absent, nothing was read)."""
    damage: str = ""
    """Why the stored bytes failed verification ("" when sound). A damaged chunk has been
    dropped from the tier by the time ``check`` returns."""


class Tier(ABC):
    """One storage level. Batched verbs; results are lists aligned with the inputs.

    Invariants every tier keeps: a chunk is returned only under the key it was stored
    with and only after verification (checksum for serialised tiers); ``bytes_used``
    never exceeds ``capacity_bytes`` when a cap is set; a failed put leaves every chunk
    stored earlier readable.
    """

    failures: ClassVar[tuple[type[BaseException], ...]] = ()
    """Exception types that mean "the backend failed" rather than "kvshare has a bug"."""

    def __init__(self, name: str, capacity_bytes: int | None) -> None:
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"{name} tier capacity_bytes={capacity_bytes} must be >= 0")
        self.name = name
        self._lock = threading.RLock()
        self._stats = TierStats(name=name, capacity_bytes=capacity_bytes)

    # -- public verbs ----------------------------------------------------------------
    def put(self, chunks: Sequence[KVChunk]) -> list[bool]:
        """Store chunks; True where the chunk is now held (or already was)."""
        if not chunks:
            return []
        start = time.perf_counter()
        ok = self._guard("put", lambda: self._put(chunks), [False] * len(chunks))
        with self._lock:
            self._stats.put_calls += 1
            self._stats.put_seconds += time.perf_counter() - start
            self._stats.stored += sum(ok)
            self._stats.rejected += len(ok) - sum(ok)
        return ok

    def get(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        """Verified chunks, None for misses (absent, corrupt, or backend down).

        A returned chunk may be the tier's own (memory tiers hand out what they hold):
        callers read it and never write into it.
        """
        if not keys:
            return []
        start = time.perf_counter()
        found = self._guard("get", lambda: self._get(keys), [None] * len(keys))
        hits = sum(chunk is not None for chunk in found)
        with self._lock:
            self._stats.get_calls += 1
            self._stats.get_seconds += time.perf_counter() - start
            self._stats.hits += hits
            self._stats.misses += len(keys) - hits
        return found

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is held (no verification; a later get may still miss)."""
        if not keys:
            return []
        return self._guard("contains", lambda: self._contains(keys), [False] * len(keys))

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Drop chunks; returns how many were held."""
        if not keys:
            return 0
        return self._guard("delete", lambda: self._delete(keys), 0)

    def keys(self) -> Iterator[ChunkKey]:
        """Every key the tier holds, in no particular order (unverified).

        A snapshot for memory and disk tiers; Redis is scanned incrementally, so keys
        written or evicted meanwhile may or may not appear. A backend failure ends the
        iteration early (and is counted like any other).
        """
        try:
            yield from self._keys()
        except self.failures as exc:
            self._record_failure("keys", exc)

    def check(self, keys: Sequence[ChunkKey]) -> list[ChunkCheck]:
        """Read and verify each chunk as ``get`` would, for a scrub (``kvshare inspect
        verify``): damaged chunks are dropped and counted in ``corrupt``; hits, misses
        and recency are left alone. A backend failure reads as not held."""
        if not keys:
            return []
        return self._guard("check", lambda: self._check(keys),
                           [ChunkCheck(key, held=False) for key in keys])

    def stats(self) -> TierStats:
        """A snapshot of the counters."""
        self._refresh_stats()
        with self._lock:
            return dataclasses.replace(self._stats)

    def close(self) -> None:  # noqa: B027 (optional hook: most tiers hold nothing to release)
        """Release backend resources (connections, threads). Idempotent."""

    # -- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _put(self, chunks: Sequence[KVChunk]) -> list[bool]: ...

    @abstractmethod
    def _get(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]: ...

    @abstractmethod
    def _contains(self, keys: Sequence[ChunkKey]) -> list[bool]: ...

    @abstractmethod
    def _delete(self, keys: Sequence[ChunkKey]) -> int: ...

    @abstractmethod
    def _keys(self) -> Iterator[ChunkKey]: ...

    @abstractmethod
    def _check(self, keys: Sequence[ChunkKey]) -> list[ChunkCheck]: ...

    def _refresh_stats(self) -> None:  # noqa: B027 (optional hook, see docstring)
        """Pull usage figures the backend keeps itself (Redis); local tiers track them."""

    # -- failure handling -----------------------------------------------------------------
    def _guard(self, verb: str, call: Callable[[], T], on_failure: T) -> T:
        errors_before = self._stats.errors
        try:
            result = call()
        except self.failures as exc:
            self._record_failure(verb, exc)
            return on_failure
        if self._stats.errors == errors_before:  # per-chunk failures inside call() count too
            self._record_success()
        return result

    def _record_failure(self, verb: str, exc: BaseException) -> None:
        with self._lock:
            was_healthy = self._stats.healthy
            self._stats.errors += 1
            self._stats.healthy = False
            self._stats.last_error = f"{verb}: {type(exc).__name__}: {exc}"
        if was_healthy:
            logger.warning("kvshare %s tier failing (%s: %s); treating as misses until it recovers",
                           self.name, verb, exc)
        else:
            logger.debug("kvshare %s tier still failing (%s: %s)", self.name, verb, exc)

    def _record_success(self) -> None:
        if self._stats.healthy:  # unlocked read: a stale True only delays the recovery line
            return
        with self._lock:
            recovered, self._stats.healthy = not self._stats.healthy, True
        if recovered:
            logger.info("kvshare %s tier recovered", self.name)
