"""The cache models of ``kvshare bench hitrate`` evict as vLLM's block pool and kvshare's
tiers do."""

from __future__ import annotations

import numpy as np
import pytest

from kvshare.bench.cache_models import BlockPool, ChunkTiers


def serve(pool, tokens, exact_tokens=None, depth=0):
    tokens = np.asarray(tokens)
    hit = pool.lookup(tokens)
    pool.run(tokens, hit, len(tokens) if exact_tokens is None else exact_tokens, depth)
    return hit


def test_block_pool_evicts_least_recently_used_blocks_and_a_prompts_tail_first():
    pool = BlockPool(block_tokens=4, num_blocks=4)
    a, b = np.arange(8), np.arange(100, 108)
    serve(pool, a)
    serve(pool, b)  # the pool is full: a's two blocks, then b's
    assert pool.lookup(np.append(a, 0)).tokens == 8
    serve(pool, np.arange(200, 204))  # needs one block: a's last, the least recently used
    assert pool.lookup(np.append(a, 0)).tokens == 4
    assert pool.lookup(np.append(b, 0)).tokens == 8
    # A prompt that hits a's first block refreshes it; it and the next prompt evict b's
    # blocks, which are older now.
    serve(pool, np.append(a[:4], [7, 7, 7, 7]))
    serve(pool, np.arange(300, 308))
    assert pool.lookup(np.append(b, 0)).tokens == 0
    assert pool.lookup(np.append(a, 0)).tokens == 4


def test_block_pool_caps_hits_below_the_last_token_and_tracks_approximate_blocks():
    pool = BlockPool(block_tokens=4, num_blocks=None)
    prompt = np.arange(12)
    assert serve(pool, prompt, exact_tokens=6, depth=2).tokens == 0
    hit = pool.lookup(prompt)  # three cached blocks, but the last token is computed
    assert (hit.tokens, hit.exact_tokens, hit.depth) == (8, 4, 2)
    assert pool.lookup(prompt[:5]).tokens == 4
    assert pool.lookup(prompt, tenant="other").tokens == 0  # hashes are per tenant


def test_chunk_tiers_write_through_promote_reads_and_evict_by_bytes():
    tiers = ChunkTiers([100, 150])
    assert tiers.put("a", 60) and tiers.put("b", 60)
    assert "a" not in tiers.tiers[0] and "a" in tiers.tiers[1]
    assert tiers.get("a") and "a" in tiers.tiers[0]  # promoted into the faster tier
    assert "b" not in tiers.tiers[0]
    tiers.put("c", 60)  # the slow tier drops b, its least recently used
    assert not tiers.get("b") and tiers.get("a") and tiers.get("c")
    assert not tiers.put("huge", 200)  # larger than every tier: nothing holds it
    with pytest.raises(ValueError, match=r"tier capacities must be > 0 bytes, got \[100, 0\]"):
        ChunkTiers([100, 0])
