"""Re-rotating stored post-RoPE keys equals computing them at the new positions."""

from __future__ import annotations

import pytest
import torch
from recompute_reference import relative_error

from kvshare.recompute import rerotate_keys


def _layer0_keys(adapter, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer-0 keys depend only on token and position: the cleanest RoPE probe."""
    x, _ = adapter.input_norm(0, adapter.embed(token_ids), None)
    q, k, _ = adapter.qkv(0, x)
    return adapter.rope(q, k, positions)[1]


@torch.no_grad()
def test_rerotated_keys_match_keys_computed_at_new_positions(smollm2):
    adapter = smollm2.adapter
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (64,), generator=gen)
    old = torch.arange(300, 364)
    delta = torch.randint(-300, 700, (64,), generator=gen)  # per token, both directions

    moved = rerotate_keys(_layer0_keys(adapter, ids, old), delta, adapter.rope_inv_freq)
    expected = _layer0_keys(adapter, ids, old + delta)

    assert relative_error(_layer0_keys(adapter, ids, old), expected) > 0.3  # the shift matters
    assert relative_error(moved, expected) < 1e-5  # the model's own fp32 angles: ~2e-6


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ],
    ids=lambda p: p["rope_type"],
)
@torch.no_grad()
def test_rerotation_follows_scaled_rope_variants(make_tiny, rope_parameters):
    loaded = make_tiny("llama", rope_parameters=rope_parameters)
    adapter = loaded.adapter
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(2))
    old = torch.arange(32)
    delta = torch.arange(32) * 7 + 5

    moved = rerotate_keys(_layer0_keys(adapter, ids, old), delta, adapter.rope_inv_freq)

    assert relative_error(moved, _layer0_keys(adapter, ids, old + delta)) < 1e-5


def test_yarn_case_exercises_attention_scaling(make_tiny):
    """YaRN folds a scale into cos/sin; re-rotation must not apply it a second time."""
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    rotary = make_tiny("llama", rope_parameters=yarn).model.model.rotary_emb
    assert rotary.attention_scaling != pytest.approx(1.0)


def test_all_layers_at_once_equals_layer_by_layer():
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 10, 2, 16, generator=gen)  # [L, n, H, D]
    delta = torch.randint(-50, 50, (10,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))

    together = rerotate_keys(keys, delta, inv_freq)

    for layer in range(3):
        torch.testing.assert_close(together[layer], rerotate_keys(keys[layer], delta, inv_freq))


def test_zero_delta_is_identity_and_bf16_stays_bf16():
    keys = torch.randn(5, 2, 16).bfloat16()
    inv_freq = torch.ones(8)
    out = rerotate_keys(keys, 0, inv_freq)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, keys)


def test_bad_shapes_are_named():
    keys = torch.zeros(5, 2, 16)
    with pytest.raises(ValueError, match=r"delta has shape \(4,\), expected \(\) or \(5,\)"):
        rerotate_keys(keys, torch.zeros(4, dtype=torch.int64), torch.ones(8))
    with pytest.raises(ValueError, match=r"inv_freq has shape \(16,\), expected \(8,\)"):
        rerotate_keys(keys, 1, torch.ones(16))
