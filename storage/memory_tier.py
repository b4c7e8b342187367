"""CPU and GPU tiers: decoded KV tensors in a byte-capped LRU.

Chunks are held as tensors, not bytes, so a hit costs no copy and no decode. The CPU
tier allocates pinned memory when CUDA is present (host-to-device copies from pinned
memory are asynchronous and about twice as fast, and a reader gets the pinned tensor
itself); the GPU tier keeps chunks in device memory, allocated through PyTorch's caching
allocator (the pool), and exists only where CUDA does.

:class:`SharedMemoryTier` is the CPU tier of the ``kvshare daemon``: the same LRU over a
shared-memory arena, so that its clients on this host read chunks in place.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvshare.storage.chunk import KVChunk
from kvshare.storage.codec import ChunkCodec
from kvshare.storage.keys import ChunkKey
from kvshare.storage.shm_arena import GRACE_S, ShmArena
from kvshare.storage.tier import ChunkCheck, Tier


class MemoryTier(Tier):
    """Byte-capped LRU of chunk tensors on one device.

    ``put`` copies the caller's tensor in (later writes by the caller cannot reach the
    cache); ``get`` returns the held tensor itself, which readers only read (the
    ``Tier.get`` contract): a clone per hit cost more than the copy a reader makes anyway
    (26-353 ms per 4K-token prompt on an H200 host, and pageable clones made host-to-device
    copies synchronous). Eviction drops least recently read or written chunks until the
    new one fits; a chunk larger than the whole cap is refused. Invariant: ``bytes_used``
    (sum of held tensors' bytes) <= ``capacity_bytes``.
    """

    failures = (torch.OutOfMemoryError, MemoryError)

    def __init__(self, capacity_bytes: int, device: str | torch.device = "cpu",
                 pin_memory: bool | None = None, name: str | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"MemoryTier device={str(self.device)!r} needs CUDA, which is not available")
        if pin_memory is None:
            pin_memory = self.device.type == "cpu" and torch.cuda.is_available()
        if pin_memory and self.device.type != "cpu":
            raise ValueError(f"pin_memory applies to CPU tiers, not device={str(self.device)!r}")
        super().__init__(name or self.device.type, capacity_bytes)
        self.capacity_bytes = capacity_bytes
        self.pin_memory = pin_memory
        self._chunks: OrderedDict[ChunkKey, KVChunk] = OrderedDict()

    @classmethod
    def cpu(cls, capacity_bytes: int) -> MemoryTier:
        """Host-memory tier, pinned when CUDA is present."""
        return cls(capacity_bytes, device="cpu")

    @classmethod
    def gpu(cls, capacity_bytes: int, device: str | torch.device = "cuda") -> MemoryTier:
        """Device-memory tier; raises ValueError without CUDA."""
        return cls(capacity_bytes, device=device, name="gpu")

    def _put(self, chunks: Sequence[KVChunk]) -> list[bool]:
        ok = []
        for chunk in chunks:
            with self._lock:
                if self._touch(chunk.key):
                    ok.append(True)
                    continue
            if chunk.nbytes > self.capacity_bytes:
                ok.append(False)
                continue
            # Copy outside the lock: readers of other chunks need not wait for it.
            kv = torch.empty(chunk.kv.shape, dtype=chunk.kv.dtype, device=self.device,
                             pin_memory=self.pin_memory)
            kv.copy_(chunk.kv)
            with self._lock:
                if chunk.key not in self._chunks:
                    self._evict_to_fit(chunk.nbytes)
                    self._chunks[chunk.key] = KVChunk(header=chunk.header, kv=kv)
                    self._stats.bytes_used += chunk.nbytes
                    self._stats.chunks += 1
            ok.append(True)
        return ok

    def _touch(self, key: ChunkKey) -> bool:
        """Mark a held chunk most recently used; False if it is not held. Caller holds
        the lock."""
        if key not in self._chunks:
            return False
        self._chunks.move_to_end(key)
        return True

    def _evict_to_fit(self, nbytes: int) -> None:
        """Drop LRU chunks until ``nbytes`` more fit. Caller holds the lock."""
        while self._stats.bytes_used + nbytes > self.capacity_bytes:
            self._evict_lru()

    def _evict_lru(self) -> None:
        """Drop the least recently used chunk. Caller holds the lock."""
        key, victim = self._chunks.popitem(last=False)
        self._stats.bytes_used -= victim.nbytes
        self._stats.chunks -= 1
        self._stats.evictions += 1
        self._release(key, victim)

    def _release(self, key: ChunkKey, chunk: KVChunk) -> None:
        """Hook: ``chunk`` left the tier (evicted or deleted). Caller holds the lock.
        Here its tensor is freed once the last reader drops it."""

    def _get(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        found: list[KVChunk | None] = []
        for key in keys:
            with self._lock:
                chunk = self._chunks.get(key)
                if chunk is not None:
                    self._chunks.move_to_end(key)
            # The held tensor stays alive through the reader's reference even if evicted.
            found.append(chunk)
        return found

    def _contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [key in self._chunks for key in keys]

    def _keys(self) -> Iterator[ChunkKey]:
        with self._lock:
            held = list(self._chunks)
        return iter(held)

    def _check(self, keys: Sequence[ChunkKey]) -> list[ChunkCheck]:
        # Tensors, not bytes: there is no checksum to recompute. What entered this tier
        # was verified (read from a serialised tier) or computed by the model.
        with self._lock:
            return [ChunkCheck(key, held=key in self._chunks) for key in keys]

    def _delete(self, keys: Sequence[ChunkKey]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                chunk = self._chunks.pop(key, None)
                if chunk is not None:
                    self._stats.bytes_used -= chunk.nbytes
                    self._stats.chunks -= 1
                    self._release(key, chunk)
                    removed += 1
        return removed


_RAW_CODEC = ChunkCodec("raw", threads=1)
"""Headers of chunks held in shared memory: the raw codec, checksum over the held bytes."""


@dataclass
class _Slot:
    """Where a held chunk lies in the arena and when it was last handed out."""

    offset: int
    head: bytes
    """Codec header (raw codec) with the checksum of the bytes as copied in."""
    read_at: float = float("-inf")
    """Arena clock of the last ``get`` that returned the chunk."""


@dataclass(frozen=True)
class SharedLocation:
    """A held chunk as a reader in another process finds it: arena file, byte range,
    and the header to verify the range with (``ChunkCodec.decode_parts``)."""

    path: str
    offset: int
    nbytes: int
    head: bytes


class SharedMemoryTier(MemoryTier):
    """CPU tier whose chunk tensors are views of a :class:`ShmArena`, so that processes
    of this user on this host can read them in place (the daemon's CPU tier).

    As :class:`MemoryTier` (byte-capped LRU, copies in, ``get`` hands out the held
    tensor; never pinned), and besides:

    * each chunk's codec header is computed once, over the bytes as copied in, so a
      reader elsewhere verifies what it maps (:meth:`locate`): a damaged range is
      refused by the reader, never used;
    * GRACE invariant: the bytes of a chunk returned by ``get`` stay unchanged for at
      least ``GRACE_S`` seconds after that get, even if it is evicted or deleted
      meanwhile (its range goes back to the arena quarantined until then);
    * a put that could make room only by evicting a chunk read within ``GRACE_S`` is
      refused: the LRU chunk being that recent means every held one is, and their ranges
      could not be reused now anyway. The chunk stays in the slower tiers.

    Invariant: every held chunk owns one arena range; ``bytes_used`` <= the arena size.
    """

    def __init__(self, arena: ShmArena, name: str = "cpu") -> None:
        super().__init__(arena.capacity_bytes, device="cpu", pin_memory=False, name=name)
        self.arena = arena
        self._slots: dict[ChunkKey, _Slot] = {}

    def _put(self, chunks: Sequence[KVChunk]) -> list[bool]:
        ok = []
        for chunk in chunks:
            with self._lock:
                if self._touch(chunk.key):
                    ok.append(True)
                    continue
                offset = self._make_room(chunk.nbytes)
            if offset is None:
                ok.append(False)
                continue
            # Copy and checksum outside the lock: readers of other chunks need not wait.
            try:
                kv = self.arena.view(offset, chunk.nbytes).view(chunk.kv.dtype).view(
                    chunk.kv.shape)
                kv.copy_(chunk.kv)
                held = KVChunk(header=chunk.header, kv=kv)
                head = bytes(_RAW_CODEC.encode_parts(held)[0])
            except BaseException:
                self.arena.release(offset, chunk.nbytes)
                raise
            with self._lock:
                if chunk.key in self._chunks:  # another thread stored it meanwhile
                    self.arena.release(offset, chunk.nbytes)  # never handed out
                else:
                    self._chunks[chunk.key] = held
                    self._slots[chunk.key] = _Slot(offset, head)
                    self._stats.bytes_used += chunk.nbytes
                    self._stats.chunks += 1
            ok.append(True)
        return ok

    def _make_room(self, nbytes: int) -> int | None:
        """An arena offset for ``nbytes``, evicting LRU chunks read more than ``GRACE_S``
        ago as needed; None when none is left to evict. Caller holds the lock."""
        if nbytes > self.capacity_bytes:
            return None
        while (offset := self.arena.allocate(nbytes)) is None:
            if not self._chunks:
                return None
            lru = next(iter(self._chunks))
            if self._slots[lru].read_at + GRACE_S > self.arena.clock():
                return None
            self._evict_lru()
        return offset

    def _release(self, key: ChunkKey, chunk: KVChunk) -> None:
        slot = self._slots.pop(key)
        self.arena.release(slot.offset, chunk.nbytes, reusable_at=slot.read_at + GRACE_S)

    def _get(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        found: list[KVChunk | None] = []
        with self._lock:  # the stamp and the lookup together: no eviction in between
            now = self.arena.clock()
            for key in keys:
                chunk = self._chunks.get(key)
                if chunk is not None:
                    self._chunks.move_to_end(key)
                    self._slots[key].read_at = now
                found.append(chunk)
        return found

    def locate(self, chunk: KVChunk) -> SharedLocation | None:
        """Where ``chunk`` (as returned by this tier's ``get``) lies in the arena; None
        when it is not this tier's (a copy from a slower tier) or has left the tier."""
        with self._lock:
            slot = self._slots.get(chunk.key)
            if slot is None or self._chunks.get(chunk.key) is not chunk:
                return None
            return SharedLocation(str(self.arena.path), slot.offset, chunk.nbytes, slot.head)

    def close(self) -> None:
        """Forget every chunk and remove the arena file (readers' views stay readable)."""
        with self._lock:
            self._chunks.clear()
            self._slots.clear()
            self._stats.bytes_used = self._stats.chunks = 0
        self.arena.close()
