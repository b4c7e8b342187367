"""The transformers adapter driven at rho = 1 is the model's own prefill."""

from __future__ import annotations

import pytest
import torch
from recompute_reference import full_prefill, relative_error

from kvshare.recompute import PromptKV, SelectiveRecomputeEngine
from kvshare.recompute.hf_adapter import HFDecoderAdapter


def _recompute_everything(adapter, ids: torch.Tensor, check_layers=(1,)):
    engine = SelectiveRecomputeEngine(adapter, rho=1.0, check_layers=check_layers)
    return engine.prefill(ids, PromptKV.empty(adapter, len(ids)), [len(ids) - 1])


@pytest.mark.parametrize("check_layers", [(1,), (0, 2)])
def test_rho_one_reproduces_tiny_model_prefill(tiny, check_layers):
    ids = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(4))
    expected_kv, expected_logits = full_prefill(tiny.model, ids)

    result = _recompute_everything(tiny.adapter, ids, check_layers)

    torch.testing.assert_close(result.kv.keys, expected_kv.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.kv.values, expected_kv.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.last_logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert result.recompute_fraction == 1.0


@torch.no_grad()
def test_qwen2_adapter_uses_the_qkv_biases(make_tiny):
    """The Qwen2 case above only means something if the biases exist and matter."""
    qwen = make_tiny("qwen2")
    attn = qwen.model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None
    x = torch.randn(3, 64)
    _, k, _ = qwen.adapter.qkv(0, x)
    assert relative_error(k.flatten(1), x @ attn.k_proj.weight.T) > 0.1


def test_rho_one_reproduces_smollm2_prefill(smollm2, comedy_prefill):
    ids, expected_kv, expected_logits = comedy_prefill

    result = _recompute_everything(smollm2.adapter, ids)

    assert relative_error(result.kv.keys, expected_kv.keys) < 1e-5
    assert relative_error(result.kv.values, expected_kv.values) < 1e-5
    torch.testing.assert_close(result.last_logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_bf16_model_runs_in_bf16_close_to_its_own_prefill(make_tiny):
    """bf16 rounding differs in op order only; dtype plumbing must hold end to end."""
    model = make_tiny("llama").model.to(torch.bfloat16)
    adapter = HFDecoderAdapter(model)
    ids = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(5))
    expected_kv, expected_logits = full_prefill(model, ids)

    result = _recompute_everything(adapter, ids)

    assert result.kv.keys.dtype == torch.bfloat16
    assert relative_error(result.kv.keys, expected_kv.keys) < 1e-2
    assert relative_error(result.last_logits, expected_logits) < 2e-2


def test_sliding_window_layers_are_refused(make_tiny):
    with pytest.raises(ValueError, match=r"layers \[2, 3\] use sliding-window attention"):
        make_tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2)


def test_length_dependent_rope_is_refused(make_tiny):
    dynamic = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(
        ValueError, match="rope_type 'dynamic' changes frequencies with prompt length"
    ):
        make_tiny("llama", rope_parameters=dynamic)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; expected one of"):
        HFDecoderAdapter(model)
