"""kvshare bench gpu: the edited prompts it times are valid reuse plans of the promised size.

The timing itself needs a GPU (the bench refuses to run without one); what it times is
built here on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvshare.bench.gpu import edit_donor, spread_positions
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
