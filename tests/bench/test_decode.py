"""``kvshare bench decode``'s statistics (the engines are exercised by its smoke run)."""

from __future__ import annotations

import math

import pytest

from kvshare.bench.decode import (
    DecodeRun,
    PairScore,
    paired_bootstrap,
    score_run,
    summarize_pairs,
    targets,
)


def test_the_bootstrap_interval_holds_the_mean_and_excludes_zero_for_a_clear_gain():
    gains = [0.01 + 0.001 * (i % 5) for i in range(40)]
    low, high = paired_bootstrap(gains)
    assert low <= sum(gains) / len(gains) <= high
    assert low > 0


def test_the_bootstrap_interval_spans_zero_for_noise():
    low, high = paired_bootstrap([(-1) ** i * 0.01 for i in range(40)])
    assert low < 0 < high


def test_a_bootstrap_needs_pairs():
    with pytest.raises(ValueError, match="at least one pair"):
        paired_bootstrap([])


def test_summary_gains_are_off_minus_on_for_kl_and_on_minus_off_else():
    def score(kl, top1, rouge, tpot):
        return PairScore(kl, top1, rouge, tpot, corrected=3, reused=20)

    scores = {f"p{i}": {"on": score(0.001, 0.99, 0.9, 0.0105),
                        "off": score(0.003, 0.97, 0.8, 0.0100)} for i in range(4)}
    summary = summarize_pairs(scores)
    assert summary["kl_gain"] == pytest.approx(0.002)
    assert summary["kl_reduction"] == pytest.approx(2 / 3)
    assert summary["top1_gain"] == pytest.approx(0.02)
    assert summary["rouge_l_gain"] == pytest.approx(0.1)
    assert summary["tpot_overhead"] == pytest.approx(0.05)
    assert targets(summary) == {"tpot_overhead_at_most_10pct": True,
                                "kl_gain_ci_excludes_zero": True}


def test_a_run_is_scored_position_by_position_against_full_compute():
    run = DecodeRun("on/p", output_ids=[5, 6], text="a b", ttft_s=1.0, e2e_s=1.5,
                    step_ids=[[5, 7], [6, 7]],
                    step_logprobs=[[math.log(0.9), math.log(0.1)],
                                   [math.log(0.6), math.log(0.4)]],
                    kvshare={"corrected": 4, "reused": 30})
    same = score_run(run, run.step_ids, run.step_logprobs, "a b")
    assert same.kl == pytest.approx(0.0, abs=1e-12) and same.top1 == 1.0
    assert same.rouge_l == 1.0 and same.tpot_s == pytest.approx(0.5)
    assert (same.corrected, same.reused) == (4, 30)
    flipped = score_run(run, [[7, 6], [6, 7]], [[math.log(0.9), math.log(0.1)],
                                                  [math.log(0.6), math.log(0.4)]], "c d")
    assert flipped.kl > 0 and flipped.top1 == 0.5 and flipped.rouge_l == 0.0
    with pytest.raises(ValueError, match="generated positions"):
        score_run(run, run.step_ids[:1], run.step_logprobs[:1], "a")
