"""Tiers stacked fastest first: read top-down with promotion, write through.

``TieredStore([gpu, cpu, disk, redis])``: ``get`` asks each tier in turn for the keys
still missing, and copies every hit into all faster tiers so the next read is cheaper;
``put`` writes every chunk to every tier, each of which evicts on its own. Tier failures
never reach the caller (see ``Tier``): a dead tier reads as misses and stores nothing,
and the store carries on with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvshare.storage.chunk import KVChunk
from kvshare.storage.keys import ChunkKey
from kvshare.storage.tier import Tier, TierStats


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
    """The chunk store the engine talks to. Thread-safe (each tier is)."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = list(tiers)

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
            for i, chunk in zip(missing, tier.get([keys[i] for i in missing])):
                if chunk is None:
                    still_missing.append(i)
                else:
                    found[i] = chunk
                    hits.append(chunk)
            for faster in self.tiers[:level]:
                faster.put(hits)
            missing = still_missing
        return found

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
        for tier in self.tiers:
            tier.close()
