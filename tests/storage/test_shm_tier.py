"""The shared-memory CPU tier: an LRU over an arena, verifiable in place, with the GRACE
invariant (a chunk handed out stays unchanged for GRACE_S seconds, evicted or not)."""

from __future__ import annotations

import pytest
import torch
from kv_samples import assert_same_chunk, make_chunks
from test_shm_arena import FakeClock

from kvshare.storage.codec import ChunkCodec, ChunkCorruptError
from kvshare.storage.memory_tier import SharedMemoryTier
from kvshare.storage.shm_arena import ALIGN, GRACE_S, ArenaMapping, ShmArena

CHUNK_TOKENS = 32  # a SMALL chunk of 32 tokens: 4,096 bytes, exactly one page


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def tier_of(tmp_path, clock, pages: int) -> SharedMemoryTier:
    return SharedMemoryTier(ShmArena(pages * ALIGN, tag="t", directory=tmp_path, clock=clock))


def test_round_trip_views_in_the_arena_and_stats(tmp_path, clock):
    chunks = make_chunks(3 * CHUNK_TOKENS - 10, CHUNK_TOKENS)
    tier = tier_of(tmp_path, clock, 4)
    assert tier.put(chunks) == [True] * 3
    for chunk in chunks:
        chunk.kv.zero_()  # the caller reuses its buffers: the tier holds copies
    want = make_chunks(3 * CHUNK_TOKENS - 10, CHUNK_TOKENS)
    got = tier.get([c.key for c in want] + [b"\0" * 16])
    assert got[3] is None
    for g, w in zip(got, want):
        assert_same_chunk(g, w)
        assert tier.arena.offset_of(g.kv) is not None
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.chunks) == (3, 1, 3)
    assert stats.bytes_used == sum(c.nbytes for c in want)
    tier.close()
    assert not tier.arena.path.exists()


def test_located_chunks_verify_in_another_mapping_and_damage_is_caught(tmp_path, clock):
    (chunk,) = make_chunks(CHUNK_TOKENS, CHUNK_TOKENS)
    tier = tier_of(tmp_path, clock, 2)
    tier.put([chunk])
    (held,) = tier.get([chunk.key])
    where = tier.locate(held)
    assert where.path == str(tier.arena.path) and where.nbytes == chunk.nbytes
    reader = ArenaMapping(where.path)
    codec = ChunkCodec("raw")
    assert_same_chunk(codec.decode_parts(where.head, reader.bytes_at(where.offset, where.nbytes)),
                      chunk)
    tier.arena.view(where.offset + 100, 1).bitwise_xor_(1)  # a flipped bit in the arena
    with pytest.raises(ChunkCorruptError, match="checksum mismatch"):
        codec.decode_parts(where.head, reader.bytes_at(where.offset, where.nbytes))
    assert tier.locate(make_chunks(CHUNK_TOKENS, CHUNK_TOKENS)[0]) is None  # not the tier's
    tier.close()


def test_full_arena_evicts_the_least_recently_used_unread_chunk(tmp_path, clock):
    chunks = make_chunks(4 * CHUNK_TOKENS, CHUNK_TOKENS)
    tier = tier_of(tmp_path, clock, 3)
    assert tier.put(chunks[:3]) == [True] * 3
    tier.put([chunks[0]])  # a put refreshes recency: 1 is the LRU now
    assert tier.put([chunks[3]]) == [True]
    assert tier.contains([c.key for c in chunks]) == [True, False, True, True]
    stats = tier.stats()
    assert stats.evictions == 1 and stats.bytes_used == 3 * chunks[0].nbytes
    big = make_chunks(4 * CHUNK_TOKENS, 4 * CHUNK_TOKENS, seed=1)[0]
    assert tier.put([big]) == [False]  # larger than the arena: refused, nothing evicted
    assert tier.stats().chunks == 3
    tier.close()


def test_a_chunk_evicted_right_after_a_get_reads_back_until_the_grace_ends(tmp_path, clock):
    """The GRACE invariant: the range of a chunk handed out is not reused for GRACE_S."""
    chunks = make_chunks(3 * CHUNK_TOKENS, CHUNK_TOKENS)
    tier = tier_of(tmp_path, clock, 2)
    tier.put(chunks[:2])
    read, _ = tier.get([chunks[0].key, chunks[1].key])
    read_at = tier.locate(read).offset
    tier.delete([chunks[0].key])  # gone from the tier right after the get
    clock.now += GRACE_S - 0.01
    assert tier.put([chunks[2]]) == [False]  # only its quarantined range could take it
    assert tier.contains([chunks[1].key]) == [True]  # (chunk 1 was read too: kept)
    assert_same_chunk(read, chunks[0])  # the reader's view is intact
    clock.now += 0.01
    assert tier.put([chunks[2]]) == [True]  # now the range is reused...
    (new,) = tier.get([chunks[2].key])
    assert tier.locate(new).offset == read_at
    assert torch.equal(read.kv.view(torch.uint8), new.kv.view(torch.uint8))  # ...under it
    tier.close()


def test_a_put_does_not_evict_chunks_read_within_the_grace(tmp_path, clock):
    chunks = make_chunks(3 * CHUNK_TOKENS, CHUNK_TOKENS)
    tier = tier_of(tmp_path, clock, 2)
    tier.put(chunks[:2])
    tier.get([chunks[0].key])
    clock.now += 1.0
    tier.get([chunks[1].key])  # every held chunk read within the grace
    clock.now += GRACE_S - 1.5
    assert tier.put([chunks[2]]) == [False]
    assert tier.contains([c.key for c in chunks]) == [True, True, False]
    clock.now += 0.5  # chunk 0's grace is over: it is the LRU and makes room at once
    assert tier.put([chunks[2]]) == [True]
    assert tier.contains([c.key for c in chunks]) == [False, True, True]
    tier.close()
