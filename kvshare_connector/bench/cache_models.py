"""Capacity models of the caches a request passes through, for ``kvshare bench hitrate``.

Token ids and byte counts in, no KV: the replay needs to know what each cache still holds
when a request arrives, not the tensors.

- :class:`BlockPool`: vLLM's KV block pool with automatic prefix caching.
- :class:`ChunkTiers`: kvshare's chunk tiers, as :class:`kvshare.storage.tiered_store.
  TieredStore` stacks them.

Both replay one request at a time, as the hit-rate benchmark does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash


@dataclass(frozen=True)
class PrefixHit:
    """vLLM's prefix-cache hit for one prompt."""

    tokens: int
    """Leading prompt tokens served from cached blocks: whole blocks, never the last token."""
    exact_tokens: int
    """Leading tokens of the hit before its first block of approximate KV (== ``tokens``
    when every hit block was computed exactly)."""
    depth: int
    """Deepest approximation among the hit's blocks (0: all exact)."""


class BlockPool:
    """vLLM's block pool with prefix caching, as vLLM's scheduler runs it.

    A block holds ``block_tokens`` tokens; only full blocks are cached, under chained
    hashes (a hash names the whole prefix up to its block, namespaced by tenant as vLLM's
    ``cache_salt`` namespaces it). A hit is the longest run of leading cached blocks,
    capped so that at least the last prompt token is computed. Free blocks wait in one
    queue: a request takes its hit blocks out of it, allocates its other blocks from the
    front (evicting whatever those cached), and when it finishes frees its blocks last
    block first; blocks without a hash (a prompt's partial last block) go to the front,
    cached ones to the back. So the least recently used blocks are evicted first and a
    finished prompt's tail before its head. ``num_blocks=None`` never evicts.

    Each cached block also records the approximation depth of its KV (0: computed
    exactly; kvshare's connector fills blocks with approximate KV that vLLM then caches).
    A prompt longer than the whole pool caches only the blocks that fit.
    """

    def __init__(self, block_tokens: int, num_blocks: int | None) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 or None (unbounded), got {num_blocks}")
        self.block_tokens = block_tokens
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict()
        """Cached free blocks (physical ids), evicted from the front."""
        self._uncached_free = num_blocks or 0
        """Free blocks that hold no cached prefix; allocated before any cached one."""
        self._next_id = 0
        self._blocks_of: dict[bytes, list[int]] = {}
        """Block hash -> physical blocks caching it (vLLM keeps every copy; a hit takes the
        first)."""
        self._hash_of: dict[int, bytes] = {}
        self._depth_of: dict[int, int] = {}

    def block_hashes(self, token_ids: np.ndarray, tenant: str = "") -> list[bytes]:
        """Chained hashes of the prompt's full blocks."""
        size = self.block_tokens
        tokens = np.ascontiguousarray(token_ids, dtype=np.int64)
        parent = xxhash.xxh3_128_digest(tenant.encode())
        hashes = []
        for start in range(0, len(tokens) - size + 1, size):
            parent = xxhash.xxh3_128_digest(parent + tokens[start : start + size].tobytes())
            hashes.append(parent)
        return hashes

    def lookup(self, token_ids: np.ndarray, tenant: str = "") -> PrefixHit:
        """The prompt's hit; changes nothing (the request may still not run)."""
        max_blocks = max(0, len(token_ids) - 1) // self.block_tokens
        hit_blocks = []
        for block_hash in self.block_hashes(token_ids, tenant)[:max_blocks]:
            blocks = self._blocks_of.get(block_hash)
            if not blocks:
                break
            hit_blocks.append(blocks[0])
        depths = [self._depth_of[block] for block in hit_blocks]
        first_approximate = next((i for i, d in enumerate(depths) if d > 0), len(depths))
        return PrefixHit(tokens=len(hit_blocks) * self.block_tokens,
                         exact_tokens=first_approximate * self.block_tokens,
                         depth=max(depths, default=0))

    def run(self, token_ids: np.ndarray, hit: PrefixHit, exact_tokens: int, depth: int,
            tenant: str = "") -> None:
        """A request ran: it read ``hit``, computed (or had filled) the rest, and finished.

        Its new blocks from the one holding position ``exact_tokens`` on carry ``depth``;
        earlier ones are exact. Hit blocks keep what they held.
        """
        hashes = self.block_hashes(token_ids, tenant)
        num_hit = hit.tokens // self.block_tokens
        hit_blocks = [self._blocks_of[h][0] for h in hashes[:num_hit]]
        for block in hit_blocks:
            self._free.pop(block, None)  # in use: not evictable while the request runs
        needed = -(-len(token_ids) // self.block_tokens) - num_hit
        new_blocks = [self._allocate() for _ in range(needed)]
        new_blocks = [block for block in new_blocks if block is not None]
        first_approximate = exact_tokens // self.block_tokens
        for j, block in enumerate(new_blocks, start=num_hit):
            if j < len(hashes):
                self._blocks_of.setdefault(hashes[j], []).append(block)
                self._hash_of[block] = hashes[j]
                self._depth_of[block] = depth if j >= first_approximate else 0
        for block in reversed(hit_blocks + new_blocks):
            if block in self._hash_of:
                self._free[block] = None
            else:
                self._uncached_free += 1

    def _allocate(self) -> int | None:
        """A free block for a new prompt block (evicting what it cached), or None if the
        pool has none left (the prompt is longer than the pool)."""
        if self.num_blocks is None or self._uncached_free > 0:
            if self.num_blocks is not None:
                self._uncached_free -= 1
            self._next_id += 1
            return self._next_id - 1
        if not self._free:
            return None
        block, _ = self._free.popitem(last=False)
        block_hash = self._hash_of.pop(block)
        del self._depth_of[block]
        copies = self._blocks_of[block_hash]
        copies.remove(block)
        if not copies:
            del self._blocks_of[block_hash]
        return block


class _ByteLRU:
    """One tier: keys with byte sizes, least recently used evicted first."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.evictions = 0
        self._sizes: OrderedDict[Hashable, int] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sizes

    def touch(self, key: Hashable) -> int | None:
        """Refresh a held key; its size, or None if not held."""
        nbytes = self._sizes.get(key)
        if nbytes is not None:
            self._sizes.move_to_end(key)
        return nbytes

    def put(self, key: Hashable, nbytes: int) -> None:
        if self.touch(key) is not None or nbytes > self.capacity_bytes:
            return
        while self.used_bytes + nbytes > self.capacity_bytes:
            _, evicted = self._sizes.popitem(last=False)
            self.used_bytes -= evicted
            self.evictions += 1
        self._sizes[key] = nbytes
        self.used_bytes += nbytes


class ChunkTiers:
    """kvshare's chunk tiers (fastest first), each an LRU byte budget.

    As :class:`kvshare.storage.tiered_store.TieredStore`: ``put`` writes through to every
    tier (a tier that holds the key only refreshes it; a chunk larger than a tier skips
    it), ``get`` asks the tiers top-down and copies a hit into every faster tier. Sizes are
    the chunks' raw KV bytes; the disk tier stores them compressed (zstd-byteplane: about
    1.46x smaller), so it holds somewhat more than this model lets it.
    """

    def __init__(self, capacities_bytes: Sequence[int]) -> None:
        if any(c <= 0 for c in capacities_bytes):
            raise ValueError(f"tier capacities must be > 0 bytes, got {list(capacities_bytes)}")
        self.tiers = [_ByteLRU(c) for c in capacities_bytes]

    def put(self, key: Hashable, nbytes: int) -> bool:
        """Write a chunk through; whether some tier holds it now."""
        for tier in self.tiers:
            tier.put(key, nbytes)
        return key in self

    def get(self, key: Hashable) -> bool:
        """Whether some tier still holds the chunk (the read refreshes it)."""
        for level, tier in enumerate(self.tiers):
            nbytes = tier.touch(key)
            if nbytes is not None:
                for faster in self.tiers[:level]:
                    faster.put(key, nbytes)
                return True
        return False

    def __contains__(self, key: Hashable) -> bool:
        return any(key in tier for tier in self.tiers)

    @property
    def evictions(self) -> int:
        return sum(tier.evictions for tier in self.tiers)
