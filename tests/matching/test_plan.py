"""ReusePlan refuses plans that break its invariants, and reports reuse correctly."""

from __future__ import annotations

import numpy as np
import pytest

from kvshare.matching.plan import Candidate, ReusePlan, ReuseRun


def plan(n, runs):
    covered = np.zeros(n, dtype=bool)
    for r in runs:
        covered[r.dst_start : r.dst_end] = True
    return ReusePlan(n, runs, np.flatnonzero(~covered))


def test_a_valid_plan_reports_its_reuse():
    p = plan(20, [ReuseRun(0, "a", 0, 8), ReuseRun(9, "b", 3, 10)])
    assert p.reused_tokens == 18
    assert p.recompute_tokens == 2
    assert p.recompute.dtype == np.int32
    assert p.recompute.tolist() == [8, 19]
    assert p.reuse_fraction == pytest.approx(0.9)
    assert p.source_entries == ("a", "b")


def test_source_entries_lists_each_entry_once_in_order_of_first_use():
    p = plan(40, [ReuseRun(1, "b", 1, 9), ReuseRun(11, "a", 5, 9), ReuseRun(21, "b", 30, 9)])
    assert p.source_entries == ("b", "a")


def test_empty_prompt_plan_has_zero_reuse_fraction():
    p = ReusePlan.no_reuse(0)
    assert p.runs == [] and p.recompute.size == 0 and p.reuse_fraction == 0.0


def test_no_reuse_recomputes_everything():
    p = ReusePlan.no_reuse(5)
    assert p.recompute.tolist() == [0, 1, 2, 3, 4] and p.reused_tokens == 0


@pytest.mark.parametrize(
    "runs, why",
    [
        ([ReuseRun(0, "a", 0, 5), ReuseRun(4, "a", 9, 3)], "overlap"),
        ([ReuseRun(6, "a", 0, 3), ReuseRun(1, "a", 9, 3)], "unsorted"),
        ([ReuseRun(0, "a", 0, 5), ReuseRun(5, "b", 9, 3)], "no boundary token"),
        ([ReuseRun(0, "a", 1, 5)], "target 0 from source 1 is not a prefix"),
        ([ReuseRun(1, "a", 1, 9)], "covers the last token"),
        ([ReuseRun(1, "a", 1, 0)], "empty run"),
        ([ReuseRun(3, "a", 1, 12)], "past the end"),
    ],
)
def test_structurally_invalid_plans_are_refused(runs, why):
    with pytest.raises(ValueError):
        plan(10, runs)


def test_recompute_must_be_exactly_the_uncovered_positions():
    with pytest.raises(ValueError, match="recompute"):
        ReusePlan(10, [ReuseRun(0, "a", 0, 5)], np.array([5, 6, 7, 8]))
    with pytest.raises(ValueError, match="recompute"):
        ReusePlan(10, [ReuseRun(0, "a", 0, 5)], np.array([4, 5, 6, 7, 8, 9]))


def test_check_refuses_runs_that_map_different_tokens_or_unknown_entries():
    target = list(range(10))
    ok = plan(10, [ReuseRun(2, "a", 3, 6)])
    source = [50, 51, 52, 2, 3, 4, 5, 6, 7, 8]
    ok.check(target, [Candidate("a", source)])
    with pytest.raises(ValueError, match="differ"):
        ok.check(target, [Candidate("a", list(range(10)))])
    with pytest.raises(ValueError, match="not among"):
        ok.check(target, [Candidate("b", source)])
    with pytest.raises(ValueError, match="past the end"):
        ok.check(target, [Candidate("a", source[:5])])
