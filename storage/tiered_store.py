"""Tiers stacked fastest first: read top-down with promotion, write through.

``TieredStore([gpu, cpu, disk, redis])``: ``get`` asks each tier in turn for the keys
still missing, and copies every hit into all faster tiers so the next read is cheaper;
``put`` writes every chunk to every tier, each of which evicts on its own. Tier failures
never reach the caller (see ``Tier``): a dead tier reads as misses and stores nothing,
and the store carries on with the others.

A tier can also hang rather than fail (a disk behind a stalled NFS mount or a dying
device): reads from a tier that is not in memory therefore run on the store's own
threads and are given ``get_timeout_s``. Keys a tier has not answered by then are asked
of the next tier, and the tier is skipped, for reads and for promotion, until its late
call returns (one warning when it stalls, one line when it answers again). Writes are
not bounded: they run on the connector's save thread, whose queue applies back-pressure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

from kvshare.storage.chunk import KVChunk
from kvshare.storage.keys import ChunkKey
from kvshare.storage.memory_tier import MemoryTier
from kvshare.storage.tier import Tier, TierStats

logger = logging.getLogger(__name__)

GET_TIMEOUT_S = 2.0
"""Default bound on one tier's read, as long as the Redis tier's socket timeout: a chunk
read takes milliseconds (a 6 MB chunk about 5 ms from a local Redis or disk)."""


class ChunkStore(Protocol):
    """What holds chunks for the connector: a :class:`TieredStore` in this process, or the
    daemon's through ``kvshare.remote.client.RemoteStore``. Failures read as misses."""

    def put(self, chunks: Sequence[KVChunk]) -> list[bool]: ...

    def get(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]: ...

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]: ...

    def delete(self, keys: Sequence[ChunkKey]) -> None: ...

    def stats(self) -> dict[str, TierStats]: ...

    def close(self) -> None: ...


class TieredStore:
    """The chunk store the engine talks to. Thread-safe (each tier is).

    Args:
        tiers: fastest first.
        get_timeout_s: seconds a tier outside memory may take to answer one ``get``
            before its keys are asked of the next tier (see the module docstring).
    """

    def __init__(self, tiers: Sequence[Tier], get_timeout_s: float = GET_TIMEOUT_S) -> None:
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if not get_timeout_s > 0:
            raise ValueError(f"get_timeout_s={get_timeout_s} must be > 0 (seconds)")
        self.tiers = list(tiers)
        self.get_timeout_s = get_timeout_s
        self._readers = {tier.name: ThreadPoolExecutor(4, thread_name_prefix=f"kvshare-{tier.name}")
                         for tier in self.tiers if not isinstance(tier, MemoryTier)}
        """Threads that run the bounded reads, per tier that may hang."""
        self._stalled: set[str] = set()
        """Tiers with a read past its timeout still running: skipped until it returns."""
        self._stall_lock = threading.Lock()

    def put(self, chunks: Sequence[KVChunk]) -> list[bool]:
        """Write through to every tier; True where at least one tier holds the chunk."""
        stored = [False] * len(chunks)
        for tier in self.tiers:
            stored = [a or b for a, b in zip(stored, tier.put(chunks))]
        return stored

    def get(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        """The first verified copy of each chunk, top-down; hits are promoted upwards."""
        found: list[KVChunk | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for level, tier in enumerate(self.tiers):
            if not missing:
                break
            hits: list[KVChunk] = []
            still_missing = []
            for i, chunk in zip(missing, self._bounded_get(tier, [keys[i] for i in missing])):
                if chunk is None:
                    still_missing.append(i)
                else:
                    found[i] = chunk
                    hits.append(chunk)
            for faster in self.tiers[:level]:
                if hits and faster.name not in self._stalled:
                    faster.put(hits)
            missing = still_missing
        return found

    def _bounded_get(self, tier: Tier, keys: list[ChunkKey]) -> list[KVChunk | None]:
        """``tier.get(keys)``, or all misses if the tier is stalled or does not answer
        within ``get_timeout_s``; memory tiers are read inline (they cannot hang)."""
        reader = self._readers.get(tier.name)
        if reader is None:
            return tier.get(keys)
        if tier.name in self._stalled:
            return [None] * len(keys)
        call = reader.submit(tier.get, keys)
        try:
            return call.result(timeout=self.get_timeout_s)
        except FutureTimeout:
            with self._stall_lock:
                first = tier.name not in self._stalled
                self._stalled.add(tier.name)
            if first:
                logger.warning("kvshare %s tier did not answer a read of %d chunks within "
                               "%.1f s; reading the next tier, skipping this one until it "
                               "answers", tier.name, len(keys), self.get_timeout_s)
                call.add_done_callback(lambda _, name=tier.name: self._answered(name))
            return [None] * len(keys)

    def _answered(self, name: str) -> None:
        """The stalled read of tier ``name`` returned: read it again."""
        with self._stall_lock:
            self._stalled.discard(name)
        logger.info("kvshare %s tier answers again", name)

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether some tier holds each key (unverified)."""
        held = [False] * len(keys)
        for tier in self.tiers:
            pending = [i for i, h in enumerate(held) if not h]
            if not pending:
                break
            for i, h in zip(pending, tier.contains([keys[i] for i in pending])):
                held[i] = h
        return held

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove the keys from every tier."""
        for tier in self.tiers:
            tier.delete(keys)

    def stats(self) -> dict[str, TierStats]:
        """Per-tier snapshots, fastest tier first."""
        return {tier.name: tier.stats() for tier in self.tiers}

    def close(self) -> None:
        for reader in self._readers.values():
            reader.shutdown(wait=False, cancel_futures=True)
        for tier in self.tiers:
            tier.close()
