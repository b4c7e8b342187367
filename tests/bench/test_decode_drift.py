"""``kvshare bench decode-drift`` on real SmolLM2: the fill it emulates, its masses and metrics.

One real ShareGPT prompt and a name-swapped copy (a pair as the quality benchmark builds
them), a few decode steps: enough to check the properties the report relies on.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from kvshare.bench import decode_drift as D
from kvshare.bench.quality import PreparedPair, chat_ids
from kvshare.config import KVShareConfig

COMEDY_PROMPT_START = "Write me a short script for a short scene from a comedy movie"
STEPS = 4


@pytest.fixture(scope="module")
def config() -> KVShareConfig:
    return KVShareConfig.from_dict({"min_reuse_fraction": 0.0, "min_reuse_tokens": 1})


@pytest.fixture(scope="module")
def model(config) -> D.Model:
    return D.load_model(config)


@pytest.fixture(scope="module")
def pair(tokenizer) -> PreparedPair:
    from kvshare.data.sharegpt import first_user_turns

    earlier = next(p for p in first_user_turns() if p.startswith(COMEDY_PROMPT_START))
    later = earlier.replace("John Thompson", "Lin Daiyu").replace("John", "Lin")
    assert later != earlier
    return PreparedPair("edit-test", "edit:name", "'John' -> 'Lin'",
                        chat_ids(tokenizer, earlier), chat_ids(tokenizer, later))


@pytest.fixture(scope="module")
def prefilled(model, config, pair):
    earlier_kv, _ = D.full_prefill(model, pair.earlier_ids)
    full_kv, full_last = D.full_prefill(model, pair.later_ids)
    fill = D.kvshare_fill(model, config, pair.earlier_ids, earlier_kv, pair.later_ids, full_kv)
    continuation = D.greedy(model, full_kv, full_last, STEPS)
    return full_kv, fill, continuation


def test_the_fill_follows_the_connector_rules(prefilled, config, pair):
    full_kv, fill, _ = prefilled
    assert fill is not None
    roles, n = fill.roles, len(pair.later_ids)
    counts = np.bincount(roles, minlength=len(D.ROLES))
    assert counts.sum() == n and counts[D.APPROX] > 0
    # vLLM computes the tail after the claim; DHD takes rho of the reused tokens.
    assert fill.end == n - 1 - config.recompute_tail_tokens
    assert (roles[fill.end:] == D.COMPUTED).all()
    assert counts[D.DHD] == round(config.rho * fill.num_reused)
    # DHD picks by deviation at the check layer: every pick deviates at least as much as
    # every reused token it left (up to float noise: the engine computes its own fresh
    # rows, the report scores against full compute's).
    left = fill.deviation[roles == D.APPROX].max()
    assert fill.deviation[roles == D.DHD].min() >= left * (1 - 1e-4)
    # Exact rows are full compute's; approx rows are not (they saw another prompt).
    error = D._row_error(fill.head, full_kv, slice(None), fill.end).sum(0).numpy()
    exact = roles[:fill.end] == D.EXACT
    approx = roles[:fill.end] == D.APPROX
    assert exact.any() and error[exact].max() < 1e-3 * error[approx].mean()


def test_masses_are_distributions_over_the_prompt(model, prefilled, pair):
    full_kv, fill, continuation = prefilled
    n = len(pair.later_ids)
    forced = D.teacher_force(model, fill.head, fill.end, [*pair.later_ids[fill.end:],
                                                          *continuation])
    masses, share = D.prompt_masses(forced.attention[:, -len(continuation):], n)
    assert masses.shape == (model.adapter.num_layers, len(continuation), n)
    assert np.allclose(masses.sum(-1), 1.0, atol=1e-6) and (masses >= 0).all()
    # Over every key a decode query sees: the prompt, the generated tokens up to its own
    # (never a later one), together one distribution.
    decode = forced.attention[:, -len(continuation):].double()
    assert torch.allclose(decode.sum(-1), torch.ones(()).double(), atol=1e-5)
    for step in range(len(continuation) - 1):
        assert decode[:, step, n + step + 1:].abs().max() == 0.0
    assert ((share > 0.0) & (share < 1.0)).all()


def test_full_compute_against_itself_has_no_drift(model, prefilled, pair):
    full_kv, fill, continuation = prefilled
    n = len(pair.later_ids)
    forced = D.teacher_force(model, full_kv, fill.end, [*pair.later_ids[fill.end:],
                                                        *continuation])
    again = D.teacher_force(model, full_kv, fill.end, [*pair.later_ids[fill.end:],
                                                       *continuation])
    masses, share = D.prompt_masses(forced.attention[:, -len(continuation):], n)
    same, _ = D.prompt_masses(again.attention[:, -len(continuation):], n)
    prefill = masses[:, 0]
    error = np.zeros(n)
    metrics = D.layer_metrics(prefill, masses.mean(1), same.mean(1), share.mean(1), fill.roles,
                              error, error)
    assert max(metrics.decode_tv) == 0.0
    assert all(v == 0.0 or math.isnan(v) for v in metrics.risen_relative_deviation)
    assert metrics.approx_share_decode == metrics.approx_share_decode_kvshare
    assert D.step_kl(forced.logits, again.logits).max() == 0.0
    # Greedy decoding and teacher forcing agree on full compute's continuation.
    assert forced.logits[-len(continuation) - 1:-1].argmax(-1).tolist() == continuation


def test_measure_pair_reports_every_step_and_correction(model, config, pair, tmp_path):
    drift = D.measure_pair(model, config, pair, STEPS, score_layers=(1,))
    assert drift is not None and drift.steps == STEPS
    assert len(drift.kl) == STEPS + 1 and min(drift.kl) >= 0.0
    assert set(drift.windows) == {"1", "all"}  # steps 8, 32, 64 were not decoded
    assert [c.budget for c in drift.corrections] == list(D.CORRECTION_BUDGETS)
    for correction in drift.corrections:
        assert correction.tokens == round(correction.budget * drift.num_reused)
        assert len(correction.kl["none"]) == STEPS - 1  # steps 2..
        assert {"deviation", "decode_attention@1", "decode_attention@mean",
                "oracle_error"} <= correction.kl.keys()
    # Layers up to the check layer are recomputed for every token: no decode drift there.
    whole = drift.windows["all"]
    assert whole.decode_tv[0] < 1e-5 and whole.decode_tv[1] < 1e-5
    assert max(whole.decode_tv[2:]) > 1e-4

    results = D.aggregate([drift])
    report = D.markdown_report({**results, "seed": 0})
    assert report.count("\n| ") >= model.adapter.num_layers
    assert "decode_attention@mean" in report
    D.plot({**results, "seed": 0}, tmp_path / "drift.png")
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_helpers():
    a = np.array([0.1, 0.5, 0.2, 0.9])
    assert D.spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert D.spearman(a, -a) == pytest.approx(-1.0)
    assert math.isnan(D.spearman(a, np.ones(4)))
    assert D.recall_at_k(a, a, 2) == 1.0
    assert D.recall_at_k(-a, a, 2) == 0.0


def test_vllm_prefix_hit_is_whole_blocks_below_the_last_token():
    block = D.VLLM_CPU_BLOCK_TOKENS
    same = list(range(3 * block))
    assert D.vllm_prefix_hit(same, same) == 2 * block  # the last token is always computed
    changed = same[:block + 5] + [-1] + same[block + 6:]
    assert D.vllm_prefix_hit(same, changed) == block
    assert D.vllm_prefix_hit([1] + same, same) == 0


def test_bad_arguments_are_named():
    parser = argparse.ArgumentParser()
    D.add_arguments(parser)
    args = parser.parse_args(["--pairs", "1"])
    args.config = None
    with pytest.raises(SystemExit, match="--pairs must be >= 2"):
        D.run(args)
    args = parser.parse_args(["--steps", "65"])
    args.config = None
    with pytest.raises(SystemExit, match=r"--steps must be in \[1, 64\], got 65"):
        D.run(args)


@pytest.mark.parametrize("value", ["1,x", "a"])
def test_bad_score_layers_are_named(value, config):
    with pytest.raises(SystemExit, match="--score-layers"):
        D._parse_layers(value, config)
