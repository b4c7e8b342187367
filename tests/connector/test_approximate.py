"""Approximate KV stays approximate: it is stored with its depth, under keys of its own,
also when it reaches a later request through vLLM's prefix cache.

On the in-process engine (prefix caching on), whose index and tiers tests can read.
"""

from __future__ import annotations

import pytest
from engines import TAIL

from kvshare.storage.keys import chunk_keys

pytestmark = pytest.mark.engine

BLOCK = 128
"""vLLM's CPU KV block size (tokens)."""


@pytest.fixture(scope="module")
def chain(engine, report_tokens):
    """Tenant "approx": S (exact), then S' = S edited at 400 (filled from S)."""
    tenant = "approx"
    s = report_tokens[300:900]
    engine.run(s, tenant)
    engine.settle()
    s_edit = s[:400] + report_tokens[60:63] + s[403:]
    out = engine.run(s_edit, tenant)
    engine.settle()
    assert out.kv_transfer_params["kvshare"]["claimed"] > 0
    assert out.kv_transfer_params["kvshare"]["depth"] == 1
    return tenant, s, s_edit


def entry_of(engine, tenant, token_ids):
    found = [e for e in engine.entries(tenant) if e.token_ids.tolist() == token_ids]
    assert len(found) == 1, f"{len(found)} entries hold these {len(token_ids)} tokens"
    return found[0]


def test_a_filled_prompt_is_stored_with_its_depth_under_keys_of_its_own(engine, chain):
    tenant, s, s_edit = chain
    exact = entry_of(engine, tenant, s)
    approx = entry_of(engine, tenant, s_edit)
    assert (exact.depth, exact.exact_tokens) == (0, len(s))
    # vLLM's prefix hit (3 blocks) and S's rows up to the edit are exact; the rest is not.
    first_edited = next(i for i, (a, b) in enumerate(zip(s, s_edit)) if a != b)
    assert 400 <= first_edited < 403
    assert (approx.depth, approx.exact_tokens) == (1, first_edited)
    content = [k.hex() for k in chunk_keys(engine.model_id, s_edit, 256, scope=tenant)]
    assert approx.chunk_keys[0] == content[0] == exact.chunk_keys[0]  # stored once, exact
    assert not set(approx.chunk_keys[1:]) & set(content + exact.chunk_keys)
    assert all((engine.chunk_dir / f"{key}.kvc").is_file() for key in approx.chunk_keys)


def test_a_prefix_hit_on_approximate_blocks_is_stored_as_approximate(engine, chain,
                                                                     report_tokens):
    """Q extends S' beyond its first four blocks: vLLM serves them from its prefix cache,
    and block 3 holds KV that kvshare filled approximately for S'."""
    tenant, _, s_edit = chain
    q = s_edit[:520] + report_tokens[1000:1000 + 4 * BLOCK + TAIL + 1 - 520]  # claims none
    out = engine.run(q, tenant)
    engine.settle()
    assert out.num_cached_tokens == 4 * BLOCK  # vLLM's own hit; too short for a claim
    assert out.kv_transfer_params is None and len(q) - 1 - TAIL <= 4 * BLOCK
    stored = entry_of(engine, tenant, q)
    assert (stored.depth, stored.exact_tokens) == (1, 3 * BLOCK)
    content = [k.hex() for k in chunk_keys(engine.model_id, q, 256, scope=tenant)]
    assert stored.chunk_keys[0] == content[0]
    assert not set(stored.chunk_keys[1:]) & set(content)


def test_the_index_stays_within_its_cap(engine, report_tokens, monkeypatch):
    index = engine.scheduler.catalog.index
    cap = len(index) + 2
    monkeypatch.setattr(index, "max_entries", cap)
    for i in range(4):
        engine.run(report_tokens[i * 50:i * 50 + 200], f"cap-{i}")
        engine.settle()
        assert len(index) <= cap
    assert [len(engine.entries(f"cap-{i}")) for i in range(4)][-2:] == [1, 1]
