"""The CacheBlend-style chunk planner: exact chunks only, same plan invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshare.matching.chunk_plan import plan_chunk_reuse
from kvshare.matching.plan import Candidate

CHUNK = 4


def test_identical_prompt_reuses_all_but_the_last_token():
    tokens = list(range(12))
    plan = plan_chunk_reuse(tokens, [Candidate("a", tokens)], chunk_tokens=CHUNK)
    assert plan.reused_tokens == 11 and plan.recompute.tolist() == [11]
    assert len(plan.runs) == 1  # contiguous chunks of one source merge into one run


def test_moved_chunks_are_found_at_any_chunk_position_with_a_boundary_token():
    source = [1, 2, 3, 4, 5, 6, 7, 8]
    target = [5, 6, 7, 8, 1, 2, 3, 4, 9]
    plan = plan_chunk_reuse(target, [Candidate("a", source)], chunk_tokens=CHUNK)
    assert [(r.dst_start, r.src_start, r.length) for r in plan.runs] == [(1, 5, 3), (5, 1, 3)]
    plan.check(target, [Candidate("a", source)])


def test_a_changed_token_loses_its_whole_chunk_unlike_alignment():
    source = list(range(16))
    target = source.copy()
    target[5] = 99
    plan = plan_chunk_reuse(target, [Candidate("a", source)], chunk_tokens=CHUNK)
    assert plan.recompute.tolist() == [4, 5, 6, 7, 8, 15]


def test_misaligned_copies_are_missed():
    source = list(range(16))
    plan = plan_chunk_reuse([100] + source, [Candidate("a", source)], chunk_tokens=CHUNK)
    assert plan.reused_tokens == 0


def test_bad_chunk_size_is_named():
    with pytest.raises(ValueError, match="chunk_tokens must be >= 2, got 1"):
        plan_chunk_reuse([1, 2], [], chunk_tokens=1)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=0, max_size=40),
    st.lists(st.lists(st.integers(0, 5), max_size=40), max_size=3),
)
def test_plans_are_valid_for_any_input(target, sources):
    candidates = [Candidate(f"c{i}", s) for i, s in enumerate(sources)]
    plan = plan_chunk_reuse(target, candidates, chunk_tokens=CHUNK)  # __post_init__ validates
    plan.check(target, candidates)
    assert plan.num_tokens == len(target)
    assert np.all(np.diff(plan.recompute) > 0)
