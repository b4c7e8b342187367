"""plan_reuse: which target tokens reuse cached KV, from which entry, and which are computed.

Most properties are checked on generated edits. Where every token id is distinct (each
candidate has its own ids, fresh tokens get new ids) the best plan is known exactly: the
target splits into maximal blocks that are contiguous in one candidate, and each block
reuses all its tokens but the first (all of them for an exact prefix), if that is at least
``min_run_tokens``. `best_reuse` computes it independently of the planner.
"""

from __future__ import annotations

from itertools import count, pairwise
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshare.matching import align
from kvshare.matching.align import equal_runs, plan_reuse
from kvshare.matching.plan import Candidate, ReuseRun

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FRESH = 10**7  # ids from here on appear in no candidate


def base(n, first=1000):
    return list(range(first, first + n))


_FRESH_IDS = count(FRESH)


def fresh(n):
    return [next(_FRESH_IDS) for _ in range(n)]


def assert_valid(plan, target, candidates, min_run=8):
    """Every invariant a consumer relies on (ReusePlan checks the structural ones itself)."""
    n = len(target)
    assert plan.num_tokens == n
    cover = np.zeros(n, dtype=int)
    for run in plan.runs:
        cover[run.dst_start : run.dst_end] += 1
    cover[plan.recompute] += 1
    assert (cover == 1).all(), "every position is reused exactly once or recomputed"
    plan.check(target, candidates)  # equal tokens, inside the source, known entry
    if n:
        assert n - 1 in plan.recompute
    sources = {c.entry_id: list(c.token_ids) for c in candidates}
    for run in plan.runs:
        assert run.length >= min_run
        if not run.is_exact_prefix:
            # The recomputed token before the run is the first token of the same equal block.
            assert run.src_start >= 1
            assert target[run.dst_start - 1] == sources[run.entry_id][run.src_start - 1]
            assert run.dst_start - 1 in plan.recompute
    assert [r.dst_start for r in plan.runs] == sorted(r.dst_start for r in plan.runs)
    assert plan.reused_tokens + plan.recompute.size == n


def best_reuse(target, candidates, min_run=8):
    """Most reusable tokens when every id occurs at most once among all candidates."""
    where = {}
    for ci, cand in enumerate(candidates):
        for pos, tok in enumerate(cand.token_ids):
            assert tok not in where, "best_reuse needs distinct ids"
            where[tok] = (ci, pos)
    usable, total, i = len(target) - 1, 0, 0
    while i < usable:
        if target[i] not in where:
            i += 1
            continue
        ci, pos = where[target[i]]
        start = i
        while i + 1 < usable and where.get(target[i + 1]) == (ci, pos + i + 1 - start):
            i += 1
        i += 1
        gain = i if start == 0 and pos == 0 else i - start - 1
        total += gain if gain >= min_run else 0
    return total


# --- the named cases, exactly -------------------------------------------------------------


def test_identical_prompt_reuses_all_but_the_last_token():
    t = base(50)
    plan = plan_reuse(t, [Candidate("e", t)])
    assert plan.runs == [ReuseRun(0, "e", 0, 49)]
    assert plan.recompute.tolist() == [49]


def test_empty_prompt():
    plan = plan_reuse([], [Candidate("e", base(10))])
    assert plan.runs == [] and plan.recompute.size == 0 and plan.reuse_fraction == 0.0


def test_one_token_prompt_is_computed():
    plan = plan_reuse([1000], [Candidate("e", base(10))])
    assert plan.runs == [] and plan.recompute.tolist() == [0]


def test_no_candidates_means_no_reuse():
    plan = plan_reuse(base(20), [])
    assert plan.runs == [] and plan.recompute.tolist() == list(range(20))


def test_replace_recomputes_the_new_tokens_and_one_boundary_token():
    s = base(100)
    t = s[:40] + fresh(3) + s[45:]
    plan = plan_reuse(t, [Candidate("e", s)])
    assert plan.runs == [ReuseRun(0, "e", 0, 40), ReuseRun(44, "e", 46, 53)]
    assert plan.recompute.tolist() == [40, 41, 42, 43, 97]


def test_insert():
    s = base(100)
    t = s[:40] + fresh(2) + s[40:]
    plan = plan_reuse(t, [Candidate("e", s)])
    assert plan.runs == [ReuseRun(0, "e", 0, 40), ReuseRun(43, "e", 41, 58)]
    assert plan.recompute.tolist() == [40, 41, 42, 101]


def test_delete():
    s = base(100)
    t = s[:40] + s[50:]
    plan = plan_reuse(t, [Candidate("e", s)])
    assert plan.runs == [ReuseRun(0, "e", 0, 40), ReuseRun(41, "e", 51, 48)]
    assert plan.recompute.tolist() == [40, 89]


def test_moved_blocks_are_both_reused():
    s = base(100)
    t = s[30:] + s[:30]  # A B -> B A
    plan = plan_reuse(t, [Candidate("e", s)])
    assert plan.runs == [ReuseRun(1, "e", 31, 69), ReuseRun(71, "e", 1, 28)]
    assert plan.recompute.tolist() == [0, 70, 99]


def test_repeated_text_reuses_the_same_source_twice():
    s = base(100)
    t = s[:50] + s[10:30] + s[50:]
    plan = plan_reuse(t, [Candidate("e", s)])
    assert plan.runs == [
        ReuseRun(0, "e", 0, 50),
        ReuseRun(51, "e", 11, 19),
        ReuseRun(71, "e", 51, 48),
    ]
    doubled = plan_reuse(s + s, [Candidate("e", s)])
    assert doubled.runs == [ReuseRun(0, "e", 0, 100), ReuseRun(101, "e", 1, 98)]


def test_splice_of_two_candidates_uses_both_and_beats_either_alone():
    a, b = base(100, first=1000), base(100, first=5000)
    t = a[:60] + b[60:]
    cands = [Candidate("a", a), Candidate("b", b)]
    plan = plan_reuse(t, cands)
    assert plan.runs == [ReuseRun(0, "a", 0, 60), ReuseRun(61, "b", 61, 38)]
    assert plan.source_entries == ("a", "b")
    assert plan.reused_tokens > max(plan_reuse(t, [c]).reused_tokens for c in cands)


def test_runs_shorter_than_min_run_tokens_after_trimming_are_not_used():
    s = base(200)
    t = s[:40] + fresh(5) + s[100:108] + fresh(5) + s[150:]  # middle block: 8 tokens
    assert [r.src_start for r in plan_reuse(t, [Candidate("e", s)]).runs] == [0, 151]
    runs7 = plan_reuse(t, [Candidate("e", s)], min_run_tokens=7).runs
    assert [(r.src_start, r.length) for r in runs7] == [(0, 40), (101, 7), (151, 48)]


def test_a_short_prompt_reuses_its_exact_prefix_only_when_long_enough():
    s = base(20)
    assert plan_reuse(s[:9], [Candidate("e", s)]).runs == [ReuseRun(0, "e", 0, 8)]
    assert plan_reuse(s[:8], [Candidate("e", s)]).runs == []


def test_ties_go_to_the_earlier_candidate():
    t = base(30)
    assert plan_reuse(t, [Candidate("x", t), Candidate("y", t)]).source_entries == ("x",)
    assert plan_reuse(t, [Candidate("y", t), Candidate("x", t)]).source_entries == ("y",)


def test_lists_tuples_and_arrays_give_the_same_plan():
    s = base(100)
    t = s[:40] + fresh(3) + s[45:]
    plans = [
        plan_reuse(conv(t), [Candidate("e", conv(s))])
        for conv in (list, tuple, lambda x: np.array(x, np.int32), lambda x: np.array(x))
    ]
    assert all(p.runs == plans[0].runs for p in plans)
    assert all(np.array_equal(p.recompute, plans[0].recompute) for p in plans)


@pytest.mark.parametrize(
    "target, candidates, kwargs, match",
    [
        ([1, 2, 3], [Candidate("a", [1, 2])], {"min_run_tokens": 0}, "min_run_tokens"),
        ([1] * 20, [Candidate("a", [1]), Candidate("a", [2])], {}, "unique"),
        ([1.5] * 20, [Candidate("a", [1])], {}, "ints"),
        ([1] * 20, [Candidate("a", [[1, 2]])], {}, "1-D"),
    ],
)
def test_bad_input_is_refused_with_the_reason(target, candidates, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_reuse(target, candidates, **kwargs)


# --- generated edits: exact optimum where ids are distinct ------------------------------


@st.composite
def distinct_world(draw):
    """Up to 3 candidates with their own ids; a target of up to 6 pieces, each a slice of a
    candidate (moved, repeated, spliced ...) or fresh tokens (inserted or replaced)."""
    cands = [
        Candidate(f"e{c}", base(draw(st.integers(0, 150)), first=1000 + c * 100_000))
        for c in range(draw(st.integers(1, 3)))
    ]
    target = []
    for _ in range(draw(st.integers(0, 6))):
        cand = draw(st.sampled_from(cands)).token_ids
        if draw(st.booleans()) and cand:
            lo = draw(st.integers(0, len(cand) - 1))
            target += cand[lo : draw(st.integers(lo + 1, len(cand)))]
        else:
            target += fresh(draw(st.integers(1, 12)))
    return target, cands, draw(st.sampled_from([1, 2, 5, 8, 13]))


@SETTINGS
@given(distinct_world())
def test_generated_splices_get_the_best_possible_plan(world):
    target, cands, min_run = world
    plan = plan_reuse(target, cands, min_run_tokens=min_run)
    assert_valid(plan, target, cands, min_run)
    assert plan.reused_tokens == best_reuse(target, cands, min_run)


EDITS = {
    "replace": lambda s, a, m, d: s[:a] + fresh(m) + s[a + m :],
    "insert": lambda s, a, m, d: s[:a] + fresh(m) + s[a:],
    "delete": lambda s, a, m, d: s[:a] + s[a + m :],
    "move": lambda s, a, m, d: s[a:] + s[:a],
    "repeat": lambda s, a, m, d: s[:a] + s[d : d + m] + s[a:],
}


@SETTINGS
@given(
    edit=st.sampled_from(sorted(EDITS)),
    n=st.integers(2, 300),
    data=st.data(),
)
def test_each_named_edit_gets_the_best_possible_plan(edit, n, data):
    s = base(n)
    a = data.draw(st.integers(0, n - 1))
    m = data.draw(st.integers(1, 40))
    d = data.draw(st.integers(0, n - 1))
    t = EDITS[edit](s, a, m, d)
    cands = [Candidate("e", s)]
    plan = plan_reuse(t, cands)
    assert_valid(plan, t, cands)
    assert plan.reused_tokens == best_reuse(t, cands)


@SETTINGS
@given(n=st.integers(20, 200), data=st.data())
def test_a_splice_of_two_long_pieces_uses_both_candidates(n, data):
    a, b = base(n, first=1000), base(n, first=500_000)
    cut = data.draw(st.integers(8, n - 10))
    target = a[:cut] + b[cut:]
    cands = [Candidate("a", a), Candidate("b", b)]
    plan = plan_reuse(target, cands)
    assert_valid(plan, target, cands)
    assert plan.source_entries == ("a", "b")
    assert plan.reused_tokens == n - 2  # one boundary token and the last token
    assert plan.reused_tokens > max(plan_reuse(target, [c]).reused_tokens for c in cands)


# --- generated edits on tiny alphabets: many spurious and repeated matches ----------------


@st.composite
def repetitive_world(draw):
    alphabet = draw(st.integers(1, 5))
    tokens = st.lists(st.integers(0, alphabet - 1), max_size=200)
    target = draw(tokens)
    cands = []
    for c in range(draw(st.integers(1, 4))):
        if draw(st.booleans()) and target:  # an edited copy of the target
            src = list(target)
            for _ in range(draw(st.integers(0, 4))):
                at = draw(st.integers(0, len(src)))
                src[at : at + draw(st.integers(0, 10))] = draw(
                    st.lists(st.integers(0, 9), max_size=10)
                )
        else:
            src = draw(tokens)
        cands.append(Candidate(f"e{c}", np.array(src, dtype=np.int64)))
    return target, cands, draw(st.sampled_from([1, 3, 8]))


@SETTINGS
@given(repetitive_world())
def test_invariants_hold_on_repetitive_text(world):
    target, cands, min_run = world
    plan = plan_reuse(target, cands, min_run_tokens=min_run)
    assert_valid(plan, target, cands, min_run)
    for cand in cands:  # a shared prefix is never lost
        src = cand.token_ids
        shared = 0
        while shared < min(len(target) - 1, len(src)) and target[shared] == src[shared]:
            shared += 1
        if shared >= min_run:
            assert plan.reused_tokens >= shared


@SETTINGS
@given(st.lists(st.integers(0, 3), min_size=2, max_size=300), st.integers(1, 9))
def test_an_identical_candidate_gives_all_but_the_last_token(target, min_run):
    cands = [Candidate("other", target[::-1]), Candidate("same", target)]
    plan = plan_reuse(target, cands, min_run_tokens=min_run)
    assert_valid(plan, target, cands, min_run)
    if len(target) - 1 >= min_run:
        assert plan.reused_tokens == len(target) - 1


def weak_hashes(tokens, k):
    """Collides all the time: only the first token of each k-gram, mod 3."""
    return (np.asarray(tokens[: tokens.size - k + 1]) % 3).astype(np.uint64) << np.uint64(62)


@SETTINGS
@given(repetitive_world())
def test_hash_collisions_never_produce_a_wrong_run(world):
    target, cands, min_run = world
    with mock.patch.object(align, "_gram_hashes", weak_hashes):
        plan = plan_reuse(target, cands, min_run_tokens=min_run)
    assert_valid(plan, target, cands, min_run)


# --- long prompts -------------------------------------------------------------------------


def edited(tokens, rng, edits):
    out = list(tokens)
    for _ in range(edits):
        at = int(rng.integers(0, len(out) - 50))
        out[at : at + int(rng.integers(0, 30))] = fresh(int(rng.integers(0, 30)))
    return out


def test_32k_token_prompt_against_eight_edited_candidates():
    rng = np.random.default_rng(0)
    s = base(32_768)
    target = edited(s, rng, 20)
    cands = [Candidate("base", s)] + [Candidate(f"e{i}", edited(s, rng, 20)) for i in range(7)]
    plan = plan_reuse(np.array(target), cands)
    assert_valid(plan, target, cands)
    best = best_reuse(target, cands[:1])
    assert best > 0.97 * len(target)
    # Every other candidate's matches lie inside the base's, so they cannot do better.
    assert plan.reused_tokens == best


def test_32k_tokens_of_one_repeated_token():
    same = np.full(32_768, 7)
    plan = plan_reuse(same, [Candidate("short", same[:20_000])])
    assert_valid(plan, same, [Candidate("short", same[:20_000])])
    assert plan.reuse_fraction > 0.99


# --- equal_runs: the plain alignment for oracles -----------------------------------------


def test_equal_runs_is_the_untrimmed_lcs_alignment():
    s = base(100)
    t = s[:40] + fresh(3) + s[45:]
    assert equal_runs(t, s) == [(0, 0, 40), (43, 45, 55)]
    assert equal_runs(s, s) == [(0, 0, 100)]
    assert equal_runs([1, 9, 2, 3], [1, 2, 3]) == [(0, 0, 1), (2, 1, 2)]  # 1-token blocks too
    assert equal_runs([], s) == []


@SETTINGS
@given(st.lists(st.integers(0, 4), max_size=120), st.lists(st.integers(0, 4), max_size=120))
def test_equal_runs_blocks_are_equal_ordered_and_as_long_as_the_lcs(t, s):
    from rapidfuzz.distance import LCSseq

    runs = equal_runs(np.array(t, dtype=np.int64), s)
    for dst, src, length in runs:
        assert length > 0 and t[dst : dst + length] == s[src : src + length]
    for (d1, s1, l1), (d2, s2, _) in pairwise(runs):
        assert d1 + l1 <= d2 and s1 + l1 <= s2
    assert sum(length for *_, length in runs) == LCSseq.similarity(t, s)
