"""kvshare bench gpu: the edited prompts it times are valid reuse plans of the promised size,
and its verdicts on the issue's targets follow the grid's numbers.

The timing itself needs a GPU (the bench refuses to run without one); what it times and
how it judges the results are checked here on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvshare.bench.gpu import check_targets, edit_donor, markdown_table, spread_positions
from kvshare.matching.plan import Candidate, ReusePlan, ReuseRun


@pytest.mark.parametrize(("num_tokens", "reuse"), [(4096, 0.9), (4096, 0.99), (1000, 0.95)])
def test_edited_prompt_reuses_the_promised_share(num_tokens, reuse):
    rng = np.random.default_rng(num_tokens)
    donor = rng.integers(0, 1000, num_tokens)
    prompt = edit_donor(donor, reuse, 1000, rng)

    assert len(prompt.token_ids) == num_tokens
    assert len(prompt.recompute) == round((1 - reuse) * num_tokens)
    assert prompt.reused_tokens == num_tokens - len(prompt.recompute)
    plan = ReusePlan(num_tokens, [ReuseRun(d, "donor", s, n) for d, s, n in prompt.runs],
                     prompt.recompute)  # validates coverage, boundaries and the last token
    plan.check(prompt.token_ids, [Candidate("donor", donor)])
    shifted = [d - s for d, s, _ in prompt.runs if d != s]
    assert shifted, "some runs must move so that their keys are re-rotated"


def test_edit_refuses_a_reuse_that_leaves_no_edit():
    with pytest.raises(ValueError, match="reuse=0.999"):
        edit_donor(np.arange(100), 0.999, 1000, np.random.default_rng(0))


def test_spread_positions_include_the_last_and_are_distinct():
    positions = spread_positions(4096, 400)
    assert positions[-1] == 4095 and len(positions) == 400
    assert (np.diff(positions) > 0).all()


def _row(tokens: int, reuse: float, rho: float, ttft_ms: float, floor_ms: float,
         full_prefill_ms: float) -> dict:
    return {"tokens": tokens, "reuse": reuse, "rho": rho, "recompute_fraction": 0.15,
            "ttft_ms": ttft_ms, "floor_ms": floor_ms, "full_prefill_ms": full_prefill_ms,
            "ttft_over_floor": round(ttft_ms / floor_ms, 3),
            "speedup": round(full_prefill_ms / ttft_ms, 2)}


def test_targets_are_judged_on_the_named_points():
    grid = [_row(4096, 0.95, 0.05, ttft_ms=20.0, floor_ms=19.0, full_prefill_ms=120.0),
            _row(16384, 0.95, 0.05, ttft_ms=80.0, floor_ms=60.0, full_prefill_ms=600.0),
            _row(16384, 0.99, 0.05, ttft_ms=60.0, floor_ms=58.0, full_prefill_ms=600.0)]
    kernels = {"rope_shift_scatter": {"fraction_of_ceiling": 0.69},
               "partial_attention": {"fraction_of_ceiling": 0.5, "min_speedup_vs_flex": 1.2}}

    targets = check_targets({"grid": grid, "kernels": kernels})

    assert targets["speedup_4096_reuse0.95_rho0.05"] == 6.0 and targets["meets_5x_at_4096"]
    assert targets["speedup_16384_reuse0.95_rho0.05"] == 7.5
    assert not targets["meets_8x_at_16384"]
    assert targets["worst_ttft_over_floor"] == round(80 / 60, 3)
    assert not targets["every_point_within_1.3x_of_floor"]
    assert targets["best_speedup"] == 10.0
    assert targets["best_point"] == {"tokens": 16384, "reuse": 0.99, "rho": 0.05}
    assert not targets["rope_shift_scatter_meets_0.7_of_copy"]
    assert targets["partial_attention_at_least_flex"]


def test_targets_leave_out_points_the_grid_lacks():
    grid = [_row(32768, 0.9, 0.1, ttft_ms=300.0, floor_ms=290.0, full_prefill_ms=1400.0)]
    kernels = {"rope_shift_scatter": {"fraction_of_ceiling": 0.9},
               "partial_attention": {"fraction_of_ceiling": 0.5}}

    targets = check_targets({"grid": grid, "kernels": kernels})

    assert targets["every_point_within_1.3x_of_floor"]
    assert not any(key.startswith(("speedup_", "meets_")) for key in targets)
    assert "partial_attention_at_least_flex" not in targets


def test_markdown_table_has_one_row_per_point_with_ttft_over_floor():
    grid = [_row(4096, 0.95, 0.05, ttft_ms=20.0, floor_ms=16.0, full_prefill_ms=120.0)]

    lines = markdown_table(grid).splitlines()

    assert len(lines) == 3
    assert lines[2] == "| 4096 | 95% | 0.05 | 15.0% | 120.0 | 16.0 | 20.0 | 6.00x | 1.25 |"
