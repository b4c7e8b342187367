"""Selection rules beyond DHD: the probes' attention, and its combinations with deviation."""

from __future__ import annotations

import pytest
import torch
from recompute_reference import full_prefill

from kvshare.config import ConfigError, KVShareConfig
from kvshare.recompute import PromptKV, SelectiveRecomputeEngine
from kvshare.recompute.engine import _attention_mass_per_kv_head, _percentile

PROMPT, PROBE_FROM, RHO = 64, 52, 0.2


def _stale_prompt(model, seed: int) -> tuple[torch.Tensor, PromptKV]:
    """A random prompt whose K/V rows are exact except a dozen stale ones."""
    ids = torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(seed))
    kv, _ = full_prefill(model, ids)
    gen = torch.Generator().manual_seed(seed + 1)
    stale = torch.randperm(PROBE_FROM - 1, generator=gen)[:12] + 1
    kv.keys[:, stale] += 0.3 * torch.randn(kv.keys[:, stale].shape, generator=gen)
    kv.values[:, stale] += 0.3 * torch.randn(kv.values[:, stale].shape, generator=gen)
    return ids, kv


def _picks(loaded, ids, kv, select_by: str, weight: float = 0.5) -> torch.Tensor:
    engine = SelectiveRecomputeEngine(loaded.adapter, rho=RHO, select_by=select_by,
                                      attention_weight=weight)
    reused = PromptKV(kv.keys.clone(), kv.values.clone())
    return engine.prefill(ids, reused, [0], logits=False, probe_from=PROBE_FROM).selected


def test_attention_mass_lands_on_the_keys_the_queries_point_at():
    """Each KV head's mass goes to the key its own query heads point at."""
    gen = torch.Generator().manual_seed(3)
    keys = 0.1 * torch.randn(10, 2, 8, generator=gen)
    q = torch.zeros(4, 4, 8)  # 4 probes; query heads 0-1 read KV head 0, 2-3 KV head 1
    q[:, :2] = 40.0 * keys[3, 0]
    q[:, 2:] = 40.0 * keys[7, 1]
    keys[3, 0] *= 10
    keys[7, 1] *= 10

    mass = _attention_mass_per_kv_head(q, keys)

    assert mass.shape == (10, 2)
    assert mass.argmax(dim=0).tolist() == [3, 7]
    assert mass[3, 0] > 0.9 * 8 and mass[7, 1] > 0.9 * 8  # 4 probes x 2 query heads each
    torch.testing.assert_close(mass.sum(dim=0), torch.full((2,), 8.0))


def test_attention_picks_the_tokens_the_probes_attend_to_at_the_check_layer(tiny):
    """``attention`` keeps exactly the reused tokens that the probes' layer-1 queries pay
    the most attention (recomputed here from the model's own layer-1 inputs)."""
    ids, kv = _stale_prompt(tiny.model, seed=21)
    with torch.no_grad():
        hidden = tiny.model(ids[None], output_hidden_states=True).hidden_states[1][0]
        x, _ = tiny.adapter.input_norm(1, hidden, None)
        q, k, _ = tiny.adapter.qkv(1, x)
        q, k = tiny.adapter.rope(q, k, torch.arange(PROMPT))
    candidates = torch.arange(1, PROBE_FROM)  # position 0 is the initial set
    mass = _attention_mass_per_kv_head(q[PROBE_FROM:], k[candidates]).sum(dim=1)
    expected = candidates[mass.topk(round(RHO * (PROBE_FROM - 1))).indices].sort().values

    picks = _picks(tiny, ids, kv, "attention")

    assert picks.tolist() == expected.tolist()
    assert picks.tolist() != _picks(tiny, ids, kv, "deviation").tolist()


def test_rank_is_dhd_at_weight_zero_and_attention_at_weight_one(tiny):
    ids, kv = _stale_prompt(tiny.model, seed=22)
    dhd, attention = _picks(tiny, ids, kv, "deviation"), _picks(tiny, ids, kv, "attention")
    assert dhd.tolist() != attention.tolist()

    assert _picks(tiny, ids, kv, "rank", weight=0.0).tolist() == dhd.tolist()
    assert _picks(tiny, ids, kv, "rank", weight=1.0).tolist() == attention.tolist()
    mixed = set(_picks(tiny, ids, kv, "rank", weight=0.5).tolist())
    assert mixed & set(dhd.tolist()) and mixed & set(attention.tolist())


def test_per_head_with_one_kv_head_is_the_product(make_tiny):
    """With one KV head the per-head product and the product of totals are one score."""
    one_head = make_tiny("llama", num_key_value_heads=1)
    ids, kv = _stale_prompt(one_head.model, seed=23)
    assert (_picks(one_head, ids, kv, "per_head").tolist()
            == _picks(one_head, ids, kv, "both").tolist())


def test_per_head_counts_deviation_only_where_its_heads_look(tiny):
    """Token 0 is stale in KV head 1, which the probes ignore; token 1 is stale in head 0,
    which they read. The product of totals prefers token 0, the per-head product token 1."""
    head_deviation = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    attention = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    deviation = head_deviation.sum(dim=1)
    scores = {rule: SelectiveRecomputeEngine(tiny.adapter, select_by=rule)._combine(
        deviation, head_deviation, attention) for rule in ("both", "per_head")}
    assert scores["both"].tolist() == [2.0, 1.0]
    assert scores["per_head"].tolist() == [0.0, 1.0]


def test_percentile_orders_scores_onto_zero_to_one():
    torch.testing.assert_close(_percentile(torch.tensor([0.3, -1.0, 5.0, 0.2])),
                               torch.tensor([2 / 3, 0.0, 1.0, 1 / 3]))
    assert _percentile(torch.tensor([7.0])).tolist() == [0.0]


def test_bad_weight_and_bad_rule_are_refused(tiny):
    with pytest.raises(ValueError, match="attention_weight must lie in \\[0, 1\\], got 1.5"):
        SelectiveRecomputeEngine(tiny.adapter, select_by="rank", attention_weight=1.5)
    with pytest.raises(ConfigError, match="rank, per_head"):
        KVShareConfig(select_by="random")
    assert KVShareConfig(select_by="per_head").select_by == "per_head"
