"""Selective recompute: what gets recomputed, and that reuse of exact K/V is lossless."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recompute_reference import full_prefill, relative_error

from kvshare.recompute import MassBudget, PromptKV, SelectiveRecomputeEngine


def _clone(kv: PromptKV) -> PromptKV:
    return PromptKV(keys=kv.keys.clone(), values=kv.values.clone())


@pytest.mark.parametrize("check_layers", [(), (1,)], ids=["naive", "dhd"])
def test_identical_prompt_with_exact_kv_recomputing_only_the_last_token(
    smollm2, comedy_prefill, check_layers
):
    ids, exact_kv, exact_logits = comedy_prefill
    engine = SelectiveRecomputeEngine(smollm2.adapter, rho=0.15, check_layers=check_layers)

    result = engine.prefill(ids, _clone(exact_kv), [len(ids) - 1])

    torch.testing.assert_close(result.last_logits, exact_logits, rtol=1e-4, atol=1e-4)
    assert relative_error(result.kv.keys, exact_kv.keys) < 1e-5
    assert relative_error(result.kv.values, exact_kv.values) < 1e-5


def test_nothing_to_recompute_runs_no_layer(tiny):
    """Naive reuse of a plan without placeholders (the claim ends before the prompt's tail,
    which vLLM computes): no module is called with zero rows, every row stays reused."""
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(9))
    exact_kv, _ = full_prefill(tiny.model, ids)
    engine = SelectiveRecomputeEngine(tiny.adapter, check_layers=())

    result = engine.prefill(ids, _clone(exact_kv), [], logits=False)

    assert result.tracked.numel() == 0 and int(result.rows_recomputed.sum()) == 0
    assert torch.equal(result.kv.keys, exact_kv.keys)


def _corrupted(kv: PromptKV, positions: torch.Tensor) -> PromptKV:
    """Stale rows at ``positions`` in every layer, as if reused from another context."""
    bad = _clone(kv)
    gen = torch.Generator().manual_seed(6)
    bad.keys[:, positions] += torch.randn(bad.keys[:, positions].shape, generator=gen)
    bad.values[:, positions] += torch.randn(bad.values[:, positions].shape, generator=gen)
    return bad


def test_dhd_finds_and_repairs_the_deviating_rows(tiny):
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(7))
    exact_kv, exact_logits = full_prefill(tiny.model, ids)
    stale = torch.tensor([5, 17, 18, 40, 63, 64, 65, 90])
    initial = [30, 99]  # plan placeholders: garbage rows
    reused = _corrupted(exact_kv, stale)
    reused.keys[:, initial] = 0.0
    reused.values[:, initial] = 0.0
    rho = len(stale) / (len(ids) - len(initial))

    result = SelectiveRecomputeEngine(tiny.adapter, rho=rho).prefill(ids, reused, initial)

    assert result.selected.tolist() == stale.tolist()
    assert result.tracked.tolist() == sorted(stale.tolist() + initial)
    torch.testing.assert_close(result.kv.keys, exact_kv.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.kv.values, exact_kv.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.last_logits, exact_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("mass", "rho_min", "rho_max", "expected"), [
    (0.5, 0.0, 1.0, 1),   # the top score alone is half the total
    (0.75, 0.0, 1.0, 2),
    (1.0, 0.0, 1.0, 7),   # zero scores are never needed
    (0.5, 0.3, 1.0, 3),   # at least rho_min of the 10 reused tokens
    (1.0, 0.0, 0.2, 2),   # at most rho_max
])
def test_a_mass_budget_keeps_the_fewest_tokens_covering_the_mass(mass, rho_min, rho_max,
                                                                 expected):
    scores = torch.tensor([1.0, 10.0, 0.0, 5.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    assert MassBudget(mass, rho_min, rho_max).tokens(scores, num_reused=10) == expected
    assert MassBudget(mass, rho_min, rho_max).tokens(torch.zeros(10), 10) == round(rho_min * 10)


@pytest.mark.parametrize(("args", "message"), [
    ((0.0, 0.1, 0.5), r"mass must lie in \(0, 1\], got 0.0"),
    ((0.5, 0.6, 0.5), r"rho_min 0.6 and rho_max 0.5"),
])
def test_bad_mass_budgets_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        MassBudget(*args)


def test_an_adaptive_budget_recomputes_as_many_rows_as_deviate(tiny):
    """Eight stale rows hold all the deviation: a 99.9% mass budget picks exactly them,
    where a fixed rho would pick its share whatever deviates."""
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(7))
    exact_kv, exact_logits = full_prefill(tiny.model, ids)
    stale = torch.tensor([5, 17, 18, 40, 63, 64, 65, 90])
    engine = SelectiveRecomputeEngine(tiny.adapter, budget=MassBudget(0.999, 0.0, 0.5))

    result = engine.prefill(ids, _corrupted(exact_kv, stale), [99])

    assert result.selected.tolist() == stale.tolist()
    torch.testing.assert_close(result.last_logits, exact_logits, rtol=1e-5, atol=1e-5)
    capped = SelectiveRecomputeEngine(tiny.adapter, budget=MassBudget(0.999, 0.0, 0.03))
    assert len(capped.prefill(ids, _corrupted(exact_kv, stale), [99]).selected) == 3


def test_naive_reuse_leaves_stale_rows_alone(tiny):
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(8))
    exact_kv, _ = full_prefill(tiny.model, ids)
    stale = torch.tensor([3, 4, 20])
    reused = _corrupted(exact_kv, stale)
    before = _clone(reused)

    result = SelectiveRecomputeEngine(tiny.adapter, check_layers=()).prefill(ids, reused, [59])

    assert result.selected.numel() == 0 and result.tracked.tolist() == [59]
    assert torch.equal(result.kv.keys[:, :59], before.keys[:, :59])
    assert result.rows_recomputed.tolist() == [1, 1, 1, 1]


def test_rows_recomputed_follow_the_check_layer_schedule(tiny):
    """Full layers before the first check, all rows at it, then initial + rho * reused."""
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(9))
    initial = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 99], dtype=np.int32)  # plan dtype
    reused_count = 100 - len(initial)

    one = SelectiveRecomputeEngine(tiny.adapter, rho=0.2, check_layers=(1,))
    result = one.prefill(ids, PromptKV.empty(tiny.adapter, 100), initial)
    assert result.rows_recomputed.tolist() == [100, 100, 29, 29]  # 11 + round(0.2 * 89)
    assert np.isin(initial, result.tracked.numpy()).all()

    gradual = SelectiveRecomputeEngine(tiny.adapter, rho=(0.5, 0.1), check_layers=(1, 2))
    result = gradual.prefill(ids, PromptKV.empty(tiny.adapter, 100), initial)
    assert result.rows_recomputed.tolist() == [100, 100, 11 + round(0.5 * reused_count), 20]
    assert result.selected.numel() == round(0.1 * reused_count)
    assert result.recompute_fraction == pytest.approx((100 + 100 + 55 + 20) / 400)


def test_without_the_last_token_there_are_no_logits(tiny):
    """The vLLM path: vLLM computes the last prompt token itself."""
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(10))
    result = SelectiveRecomputeEngine(tiny.adapter).prefill(
        ids, PromptKV.empty(tiny.adapter, 20), [4, 5]
    )
    assert result.last_logits is None


def test_nothing_to_recompute_leaves_the_kv_untouched(tiny):
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(11))
    kv = PromptKV.empty(tiny.adapter, 20)
    kv.keys.fill_(3.0)
    result = SelectiveRecomputeEngine(tiny.adapter, check_layers=()).prefill(ids, kv, [])
    assert result.tracked.numel() == 0 and result.last_logits is None
    assert bool((result.kv.keys == 3.0).all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"check_layers": (2, 1)}, r"check_layers must be strictly increasing, got \(2, 1\)"),
        ({"check_layers": (4,)}, r"check_layers \(4,\) out of range for a model with 4 layers"),
        (
            {"rho": 1.5},
            r"rho must lie in \[0, 1\] and not increase over check layers, got \(1.5,\)",
        ),
        (
            {"rho": (0.1, 0.3), "check_layers": (1, 2)},
            r"not increase over check layers, got \(0.1, 0.3\)",
        ),
        ({"rho": (0.1, 0.05)}, r"got 2 rho values \(0.1, 0.05\) for check_layers \(1,\)"),
    ],
)
def test_bad_settings_are_named(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectiveRecomputeEngine(tiny.adapter, **kwargs)


def test_bad_inputs_are_named(tiny):
    engine = SelectiveRecomputeEngine(tiny.adapter)
    ids = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(
        ValueError, match=r"recompute positions \[10, -1\] out of range for a prompt of 10"
    ):
        engine.prefill(ids, PromptKV.empty(tiny.adapter, 10), [3, 10, -1])
    with pytest.raises(
        ValueError, match=r"reused.keys has shape \(4, 9, 2, 16\), expected \(4, 10, 2, 16\)"
    ):
        engine.prefill(ids, PromptKV.empty(tiny.adapter, 9), [9])
    half = PromptKV(*(t.half() for t in (PromptKV.empty(tiny.adapter, 10).keys,) * 2))
    with pytest.raises(
        ValueError, match=r"reused.keys is torch.float16 on cpu, expected torch.float32"
    ):
        engine.prefill(ids, half, [9])


def test_exact_prefix_is_attended_but_never_recomputed(tiny):
    ids = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(11))
    exact_kv, exact_logits = full_prefill(tiny.model, ids)
    reused = _clone(exact_kv)
    reused.keys[:, 32:] = 0.0  # only the prefix is given; everything after is computed
    reused.values[:, 32:] = 0.0

    result = SelectiveRecomputeEngine(tiny.adapter, rho=1.0).prefill(
        ids, reused, range(32, 80), exact_prefix=32)

    assert result.tracked.tolist() == list(range(32, 80))
    assert result.rows_recomputed.tolist() == [48] * tiny.adapter.num_layers
    torch.testing.assert_close(result.kv.keys, exact_kv.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.last_logits, exact_logits, rtol=1e-5, atol=1e-5)


def test_recompute_inside_the_exact_prefix_is_refused(tiny):
    ids = torch.arange(20)
    engine = SelectiveRecomputeEngine(tiny.adapter)
    with pytest.raises(ValueError, match=r"recompute positions \[3\] lie outside \[8, 20\)"):
        engine.prefill(ids, PromptKV.empty(tiny.adapter, 20), [3, 19], exact_prefix=8)
    with pytest.raises(ValueError, match="exact_prefix must lie in"):
        engine.prefill(ids, PromptKV.empty(tiny.adapter, 20), [19], exact_prefix=20)


def test_without_logits_the_kv_is_the_same(tiny):
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(12))
    exact_kv, _ = full_prefill(tiny.model, ids)
    engine = SelectiveRecomputeEngine(tiny.adapter, rho=0.2)
    with_logits = engine.prefill(ids, _corrupted(exact_kv, torch.tensor([4, 30])), [10, 49])
    without = engine.prefill(ids, _corrupted(exact_kv, torch.tensor([4, 30])), [10, 49],
                             logits=False)
    assert without.last_logits is None and with_logits.last_logits is not None
    assert torch.equal(without.kv.keys, with_logits.kv.keys)
    assert torch.equal(without.kv.values, with_logits.kv.values)


def test_probes_rank_the_reused_tokens_and_are_never_kept(tiny):
    """The tail (positions >= probe_from) runs up to the check layer only: its rows at
    later layers are never written, and it is never part of what the engine keeps."""
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(13))
    exact_kv, _ = full_prefill(tiny.model, ids)
    reused = _corrupted(exact_kv, torch.tensor([4, 9, 20, 33]))
    before = _clone(reused)
    engine = SelectiveRecomputeEngine(tiny.adapter, rho=0.1, select_by="both")

    result = engine.prefill(ids, reused, [10], logits=False, probe_from=48)

    assert int(result.tracked.max()) < 48 and 10 in result.tracked.tolist()
    assert result.selected.numel() == round(0.1 * (48 - 1))
    assert result.rows_recomputed[:2].tolist() == [60, 60]  # probes included up to layer 1
    assert result.rows_recomputed[2:].max() < 48
    assert torch.equal(result.kv.keys[2:, 48:], before.keys[2:, 48:])


@pytest.mark.parametrize("select_by", ["attention", "both"])
def test_ranking_by_attention_needs_probes(tiny, select_by):
    engine = SelectiveRecomputeEngine(tiny.adapter, select_by=select_by)
    with pytest.raises(ValueError, match="there are none: pass probe_from"):
        engine.prefill(torch.arange(20), PromptKV.empty(tiny.adapter, 20), [19])
    with pytest.raises(ValueError, match="select_by must be one of deviation, attention, both"):
        SelectiveRecomputeEngine(tiny.adapter, select_by="random")


def test_attention_mass_is_the_softmax_share_each_key_gets():
    from kvshare.recompute.engine import _attention_mass

    gen = torch.Generator().manual_seed(14)
    q, keys = torch.randn(3, 4, 8, generator=gen), torch.randn(10, 2, 8, generator=gen)
    expected = torch.zeros(10)
    for probe in range(3):
        for head in range(4):  # grouped-query heads: 2 query heads per kv head
            weights = (keys[:, head // 2] @ q[probe, head] / 8 ** 0.5).softmax(dim=0)
            expected += weights
    torch.testing.assert_close(_attention_mass(q, keys), expected)
    assert _attention_mass(q, keys).sum().item() == pytest.approx(12.0)
