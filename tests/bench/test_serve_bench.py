"""``kvshare bench serve``'s measurements from streamed event times (no server needed)."""

from __future__ import annotations

import pytest

from kvshare.bench.serve import Streamed, comparison, percentile, system_summary, token_gaps


def streamed(name: str, sent: float, events: list[float], *, hit: bool = False,
             cached: int = 0, prompt: int = 1000) -> Streamed:
    return Streamed(name, hit, prompt, sent, events, cached)


def test_gaps_in_which_another_requests_fill_ended_are_during_fills():
    running = streamed("running", 0.0, [0.5, 0.6, 0.7, 1.2, 1.3])
    filled = streamed("filled", 0.8, [1.1, 1.2], hit=True, cached=900)  # fill ended at 1.1
    unfilled = streamed("miss", 0.0, [0.65, 0.75], cached=0)  # a miss's first token
    during, without = token_gaps([running, filled, unfilled])
    # running's gaps: 0.5-0.6, 0.6-0.7, 0.7-1.2 (holds 1.1), 1.2-1.3; filled's 1.1-1.2
    # (its own fill ended as it began); the miss's 0.65-0.75.
    assert during == pytest.approx([0.5])
    assert without == pytest.approx([0.1] * 5)


def test_a_fill_ending_a_moment_after_a_gap_belongs_to_that_gaps_step():
    running = streamed("running", 0.0, [0.5, 0.9, 1.0])
    filled = streamed("filled", 0.0, [0.902, 1.0], hit=True, cached=900)
    during, _ = token_gaps([running, filled])
    assert during == pytest.approx([0.4])


def test_summary_and_the_issue_figures():
    fcfs = [streamed("h", 0.0, [2.0, 2.1, 2.2], hit=True, cached=900),
            streamed("m", 0.0, [1.0, 1.1, 1.2])]
    aware = [streamed("h", 0.0, [0.5, 0.6, 0.7], hit=True, cached=900),
             streamed("m", 0.0, [1.5, 1.6, 1.7])]
    vanilla = [streamed("h", 0.0, [2.0, 2.1, 4.0], hit=True), streamed("m", 0.0, [1.0, 1.1, 1.2])]
    systems = {"vanilla": system_summary(vanilla), "fcfs": system_summary(fcfs),
               "cache-aware": system_summary(aware)}
    assert systems["fcfs"]["mean_ttft_s"] == pytest.approx(1.5)
    assert systems["cache-aware"]["requests_per_s"] == pytest.approx(2 / 1.7)
    figures = comparison(systems)
    assert figures["mean_ttft_gain_vs_fcfs"] == pytest.approx(1 - 1.0 / 1.5)
    assert figures["p99_ttft_misses_ratio"] == pytest.approx(1.5)
    assert figures["throughput_vs_vanilla"] == pytest.approx(4.0 / 1.7)


def test_percentile_interpolates_and_is_none_without_values():
    assert percentile([], 0.99) is None
    assert percentile([1.0, 2.0, 3.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)
