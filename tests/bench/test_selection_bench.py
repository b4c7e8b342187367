"""The selection study's arithmetic: where a rule's KL curve reaches DHD's, and the
claim it replays."""

from __future__ import annotations

import math

import pytest

from kvshare.bench.selection import bench_config, claim_of, compare, share_to_reach


def test_share_to_reach_interpolates_log_kl_between_grid_points():
    curve = [(0.05, 0.004), (0.10, 0.002), (0.15, 0.001)]
    # Halfway in log KL between 0.004 and 0.002 is sqrt(0.004 * 0.002).
    assert share_to_reach(curve, math.sqrt(0.004 * 0.002)) == pytest.approx(0.075)
    assert share_to_reach(curve, 0.001) == pytest.approx(0.15)
    assert share_to_reach(curve, 0.005) == 0.05  # the first point already reaches it
    assert share_to_reach(curve, 0.0005) is None


def test_compare_puts_dhd_at_its_own_default_and_finds_a_better_rule():
    rhos = (0.05, 0.1, 0.15, 0.2)
    summary = {}
    for rule, kls in {"deviation": (0.004, 0.003, 0.002, 0.001),
                      "better": (0.003, 0.002, 0.0015, 0.001)}.items():
        for rho, kl in zip(rhos, kls):
            summary[f"{rule}/{rho:g}"] = {"kl_mean": kl, "computed_share": 0.2 + rho}
    out = compare(summary, ["deviation", "better"], rhos)
    assert out["deviation"]["rho_ratio"] == pytest.approx(1.0)
    assert out["better"]["rho_to_reach_dhd"] == pytest.approx(0.10)
    assert out["better"]["rho_ratio"] == pytest.approx(2 / 3)
    assert not out["better"]["bound"]


def test_the_claim_stops_before_the_tail_and_lists_the_edit_as_initial():
    earlier = list(range(100, 300))
    later = earlier[:120] + [7, 8] + earlier[122:]  # two tokens replaced
    claim = claim_of(bench_config(), earlier, later)
    assert claim["start"] == 0  # below one 128-token vLLM block: no prefix hit
    assert claim["end"] == len(later) - 1 - bench_config().recompute_tail_tokens
    assert {120, 121} <= set(claim["initial"])
    assert all(dst == src for dst, src, _ in claim["runs"])  # nothing moved
