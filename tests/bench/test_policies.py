"""The hit-rate baselines behave like the systems they stand for."""

from __future__ import annotations

import numpy as np

from kvshare.bench.policies import (
    ChunkHashPolicy,
    PrefixCachePolicy,
    Request,
    ResponseCachePolicy,
    SpanOraclePolicy,
)
from kvshare.bench.workload import nearest_earlier


def req(i, tokens):
    return Request(i, "", np.asarray(tokens, np.int32))


def test_prefix_cache_hits_whole_leading_blocks_and_recomputes_the_last_token():
    policy = PrefixCachePolicy(16)
    base = np.arange(100)
    policy.remember(req(0, base))
    assert policy.reuse(req(1, base)) == 96  # 6 full blocks; never the whole prompt
    edited = base.copy()
    edited[40] = -1  # inside block 2
    assert policy.reuse(req(2, edited)) == 32
    assert policy.reuse(req(3, np.arange(1, 101))) == 0  # shifted by one: no block matches
    exact_blocks = np.arange(64)
    policy.remember(req(4, exact_blocks))
    assert policy.reuse(req(5, exact_blocks)) == 48  # full hit backs off one block


def test_chunk_hashes_match_at_any_chunk_position():
    policy = ChunkHashPolicy(4)
    policy.remember(req(0, [1, 2, 3, 4, 5, 6, 7, 8]))
    assert policy.reuse(req(1, [5, 6, 7, 8, 1, 2, 3, 4, 9])) == 8
    assert policy.reuse(req(2, [0, 1, 2, 3, 4, 5, 6, 7, 8])) == 0  # misaligned by one


def test_response_cache_is_all_or_nothing_at_the_threshold():
    policy = ResponseCachePolicy(np.array([-np.inf, 0.79, 0.8]), threshold=0.8)
    assert [policy.reuse(req(i, np.arange(10))) for i in range(3)] == [0, 0, 10]


def test_span_oracle_trims_runs_and_lcs_counts_everything():
    source = np.arange(40)
    target = np.concatenate([source[:20], [999], source[21:25], [998], source[26:]])
    neighbours = np.array([[-1], [0]])
    span = SpanOraclePolicy("oracle", neighbours, [source, target])
    lcs = SpanOraclePolicy("oracle_lcs", neighbours, [source, target], lcs=True)
    assert span.reuse(req(1, target)) == 18 + 12  # runs of 20 and 14 (the 4-run is < 8)
    assert lcs.reuse(req(1, target)) == 20 + 4 + 14
    assert span.reuse(req(0, source)) == 0  # no earlier prompt


def test_nearest_earlier_matches_brute_force():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1500, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    indices, sims = nearest_earlier(vectors, 3)
    assert (indices[0] == -1).all() and (indices[1] == [0, -1, -1]).all()
    for i in (5, 1100, 1499):
        expected = np.argsort(-(vectors[:i] @ vectors[i]))[:3]
        assert indices[i].tolist() == expected.tolist()
        np.testing.assert_allclose(sims[i], vectors[expected] @ vectors[i], rtol=1e-5)
