"""Teacher-forced scores on hand-made log-probability rows (no engine)."""

from __future__ import annotations

import math

import pytest

from kvshare.bench.teacher_forcing import PositionScore, Row, score_position, summarize


def row(probs: dict[int, float]) -> Row:
    return Row({token: math.log(p) for token, p in probs.items()})


def test_identical_rows_score_zero_kl_and_agree():
    ref = row({1: 0.6, 2: 0.3, 3: 0.05})
    score = score_position(ref, ref)
    assert score.kl == 0.0 and score.top1
    assert score.rest_mass == pytest.approx(0.05)


def test_kl_is_exact_over_shared_tokens_plus_the_rest_bucket():
    ref = row({1: 0.6, 2: 0.3, 3: 0.05})    # rest 0.05
    sys = row({1: 0.5, 2: 0.4, 4: 0.05})    # 3 unknown to the system: in its rest (0.1)
    score = score_position(ref, sys)
    # partition {1}, {2}, rest: ref (0.6, 0.3, 0.1), system (0.5, 0.4, 0.1)
    expected = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.4) + 0.1 * math.log(1.0)
    assert score.kl == pytest.approx(expected)
    assert score.rest_mass == pytest.approx(0.1)  # token 3 moved to the rest
    assert score.top1


def test_coarser_partition_never_exceeds_the_full_kl():
    full_ref = {1: 0.5, 2: 0.2, 3: 0.2, 4: 0.1}
    full_sys = {1: 0.4, 2: 0.1, 3: 0.3, 4: 0.2}
    exact = sum(p * math.log(p / full_sys[t]) for t, p in full_ref.items())
    assert score_position(row(full_ref), row(full_sys)).kl == pytest.approx(exact)
    top2 = score_position(row({1: 0.5, 2: 0.2}), row({1: 0.4, 2: 0.1}))
    assert 0.0 < top2.kl < exact


def test_top1_is_the_systems_own_argmax():
    ref = row({1: 0.5, 2: 0.4})
    assert not score_position(ref, row({1: 0.3, 2: 0.6})).top1
    assert score_position(ref, row({1: 0.45, 2: 0.44, 9: 0.01})).top1


def test_mass_the_system_puts_outside_the_reference_counts():
    ref = row({1: 0.9, 2: 0.09})
    sys = row({1: 0.1, 2: 0.01})   # the system's mass is elsewhere: its rest is 0.89
    score = score_position(ref, sys)
    expected = (0.9 * math.log(0.9 / 0.1) + 0.09 * math.log(0.09 / 0.01)
                + 0.01 * math.log(0.01 / 0.89))
    assert score.kl == pytest.approx(expected)


def test_rows_without_a_shared_token_are_an_error():
    with pytest.raises(ValueError, match="share no token"):
        score_position(row({1: 0.5}), row({2: 0.5}))
    with pytest.raises(ValueError, match="as many log-probabilities as ids"):
        Row.of([1, 2], [-0.1])


def test_summary_weighs_positions_equally():
    scores = [PositionScore(0.3, True, 0.1), PositionScore(0.0, False, 0.0),
              PositionScore(0.6, True, 0.2)]
    summary = summarize(scores)
    assert summary.kl_mean == pytest.approx(0.3)
    assert summary.top1_agree == pytest.approx(2 / 3)
    assert summary.rest_mass_mean == pytest.approx(0.1)
    assert summary.positions == 3
    assert summarize([]) is None
