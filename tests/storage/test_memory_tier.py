"""CPU tier: byte-capped LRU of tensors; copies in and out."""

import pytest
import torch
from kv_samples import assert_same_chunk, make_chunks

from kvshare.storage.memory_tier import MemoryTier


def test_round_trip_and_stats():
    chunks = make_chunks(40, 16)
    tier = MemoryTier.cpu(capacity_bytes=1 << 20)
    assert tier.put(chunks) == [True, True, True]
    got = tier.get([c.key for c in chunks] + [b"\0" * 16])
    for g, c in zip(got, chunks):
        assert_same_chunk(g, c)
    assert got[3] is None
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.chunks) == (3, 1, 3)
    assert stats.bytes_used == sum(c.nbytes for c in chunks)


def test_eviction_drops_least_recently_used_and_holds_the_byte_cap():
    chunks = make_chunks(64, 16)  # 4 chunks of equal size
    size = chunks[0].nbytes
    tier = MemoryTier.cpu(capacity_bytes=3 * size)
    tier.put(chunks[:3])
    tier.get([chunks[0].key])  # 0 is now the most recent; 1 is the LRU
    tier.put([chunks[3]])
    assert tier.contains([c.key for c in chunks]) == [True, False, True, True]
    stats = tier.stats()
    assert stats.evictions == 1
    assert stats.bytes_used == 3 * size <= stats.capacity_bytes


def test_a_chunk_larger_than_the_cap_is_refused_without_evicting():
    small, big = make_chunks(16, 16)[0], make_chunks(64, 64, seed=1)[0]
    tier = MemoryTier.cpu(capacity_bytes=small.nbytes * 2)
    tier.put([small])
    assert tier.put([big]) == [False]
    assert tier.contains([small.key]) == [True]
    assert tier.stats().rejected == 1


def test_cache_is_isolated_from_caller_writes_and_reads_copy_nothing():
    (chunk,) = make_chunks(16, 16)
    original = chunk.kv.clone()
    tier = MemoryTier.cpu(capacity_bytes=1 << 20)
    tier.put([chunk])
    chunk.kv.zero_()  # caller reuses its buffer
    (got,) = tier.get([chunk.key])
    assert torch.equal(got.kv, original)
    (again,) = tier.get([chunk.key])
    assert again.kv.data_ptr() == got.kv.data_ptr()  # the held tensor, not a clone
    tier.delete([chunk.key])
    assert torch.equal(got.kv, original)  # a reader's reference outlives eviction


def test_put_of_a_held_key_refreshes_recency_without_double_counting():
    chunks = make_chunks(48, 16)
    tier = MemoryTier.cpu(capacity_bytes=2 * chunks[0].nbytes)
    tier.put(chunks[:2])
    tier.put([chunks[0]])  # 1 is now the LRU
    tier.put([chunks[2]])
    assert tier.contains([c.key for c in chunks]) == [True, False, True]
    assert tier.stats().bytes_used == 2 * chunks[0].nbytes


def test_delete_frees_bytes():
    chunks = make_chunks(32, 16)
    tier = MemoryTier.cpu(capacity_bytes=1 << 20)
    tier.put(chunks)
    assert tier.delete([chunks[0].key, b"\1" * 16]) == 1
    assert tier.contains([c.key for c in chunks]) == [False, True]
    assert tier.stats().bytes_used == chunks[1].nbytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gpu_tier_needs_cuda():
    with pytest.raises(ValueError, match="device='cuda' needs CUDA"):
        MemoryTier.gpu(1 << 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tier_holds_chunks_in_device_memory_and_cpu_tier_pins():
    chunks = make_chunks(32, 16)
    gpu = MemoryTier.gpu(capacity_bytes=chunks[0].nbytes)
    assert gpu.put(chunks) == [True, True]
    assert gpu.contains([c.key for c in chunks]) == [False, True]
    (got,) = gpu.get([chunks[1].key])
    assert got.kv.is_cuda
    assert_same_chunk(got, chunks[1])
    cpu = MemoryTier.cpu(capacity_bytes=1 << 20)
    cpu.put(chunks)
    assert cpu.pin_memory and cpu._chunks[chunks[0].key].kv.is_pinned()


def test_keys_and_check_list_what_is_held_without_touching_recency():
    chunks = make_chunks(16 * 3, 16)
    tier = MemoryTier.cpu(capacity_bytes=3 * chunks[0].nbytes)
    tier.put(chunks)
    assert sorted(tier.keys()) == sorted(c.key for c in chunks)
    checks = tier.check([chunks[0].key, b"\0" * 16])
    assert [(c.held, c.damage) for c in checks] == [(True, ""), (False, "")]
    tier.put(make_chunks(16, 16, seed=9))  # evicts the least recently used: chunk 0 still
    assert chunks[0].key not in set(tier.keys())
    assert (tier.stats().hits, tier.stats().misses) == (0, 0)
