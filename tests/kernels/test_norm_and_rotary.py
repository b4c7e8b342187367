"""add_rms_norm and apply_rotary: the Triton kernels against transformers' own arithmetic.

Both kernels round where PyTorch rounds. In the interpreter rotary results must equal
transformers' ``apply_rotary_pos_emb`` exactly; compiled, bf16 elements may be one
rounding apart (relative error under 1e-2). Normed rows may also differ where the
float32 mean, summed in another order, tips a rounding.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_error

from kvshare.kernels.rms_norm import add_rms_norm, add_rms_norm_reference
from kvshare.kernels.rotary import apply_rotary, apply_rotary_reference


def _norm_triton(*args):
    from kvshare.kernels._rms_norm_triton import add_rms_norm_triton

    return add_rms_norm_triton(*args)


def _rotary_triton(*args):
    from kvshare.kernels._rotary_triton import apply_rotary_triton

    return apply_rotary_triton(*args)


def _dtype_for(device: torch.device, cpu_dtype: torch.dtype) -> torch.dtype:
    return cpu_dtype if device.type == "cpu" else torch.bfloat16


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_matches_transformers(kernel_device, dtype, with_residual):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    dtype = _dtype_for(kernel_device, dtype)
    hidden = 96  # not a power of two: the row tile is masked
    g = torch.Generator().manual_seed(1)
    update = torch.randn(7, hidden, generator=g).to(kernel_device, dtype)
    residual = torch.randn(7, hidden, generator=g).to(kernel_device, dtype)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(kernel_device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=g) + 0.5)
    residual_in = residual if with_residual else None

    normed, stream = _norm_triton(update, residual_in, norm.weight, norm.variance_epsilon)

    expected_stream = residual + update if with_residual else update
    assert torch.equal(stream, expected_stream)
    with torch.no_grad():
        expected = norm(expected_stream)
    assert normed.dtype == expected.dtype
    assert rel_error(normed, expected) < (1e-6 if dtype == torch.float32 else 1e-2)
    ref_normed, ref_stream = add_rms_norm_reference(update, residual_in, norm.weight, 1e-5)
    assert torch.equal(ref_normed, expected) and torch.equal(ref_stream, expected_stream)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 2, 16), (9, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_rotary_matches_transformers(kernel_device, dtype, heads, kv_heads, dim):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    dtype = _dtype_for(kernel_device, dtype)
    config = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=4096)
    rotary = LlamaRotaryEmbedding(config).to(kernel_device)
    g = torch.Generator().manual_seed(heads)
    q = torch.randn(11, heads, dim, generator=g).to(kernel_device, dtype)
    k = torch.randn(11, kv_heads, dim, generator=g).to(kernel_device, dtype)
    positions = torch.randperm(4096, generator=g)[:11].sort().values.to(kernel_device)
    cos, sin = rotary(q, positions[None, :])

    got_q, got_k = _rotary_triton(q, k, cos[0], sin[0])
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)

    if kernel_device.type == "cuda":  # bf16, compiled: one rounding apart at most
        assert rel_error(got_q, want_q) < 1e-2 and rel_error(got_k, want_k) < 1e-2
    else:
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    ref_q, ref_k = apply_rotary_reference(q, k, cos[0], sin[0])
    assert torch.equal(ref_q, want_q) and torch.equal(ref_k, want_k)


def test_dispatch_runs_the_references_off_cuda():
    g = torch.Generator().manual_seed(3)
    update, residual, weight = torch.randn(3, 8, generator=g), torch.randn(3, 8), torch.ones(8)
    assert all(torch.equal(a, b) for a, b in zip(
        add_rms_norm(update, residual, weight, 1e-6),
        add_rms_norm_reference(update, residual, weight, 1e-6)))
    q, k, cos, sin = (torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 8),
                      torch.randn(3, 8))
    assert all(torch.equal(a, b) for a, b in zip(apply_rotary(q, k, cos, sin),
                                                 apply_rotary_reference(q, k, cos, sin)))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="weight \\[hidden\\]"):
        add_rms_norm(torch.zeros(2, 8), None, torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="cos and sin must be"):
        apply_rotary(torch.zeros(2, 2, 8), torch.zeros(2, 1, 8), torch.zeros(2, 4),
                     torch.zeros(2, 4))


def test_llama3_8b_rows_bf16_on_gpu(cuda):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    g = torch.Generator().manual_seed(4)
    update = torch.randn(1638, 4096, generator=g).to(cuda, torch.bfloat16)
    residual = torch.randn(1638, 4096, generator=g).to(cuda, torch.bfloat16)
    norm = LlamaRMSNorm(4096, eps=1e-5).to(cuda, torch.bfloat16)
    normed, stream = add_rms_norm(update, residual, norm.weight, 1e-5)
    with torch.no_grad():
        expected = norm(residual + update)
    assert torch.equal(stream, residual + update)
    assert rel_error(normed, expected) < 1e-2
    assert (normed != expected).float().mean() < 0.01  # only tipped roundings differ

    config = LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         max_position_embeddings=131072)
    rotary = LlamaRotaryEmbedding(config).to(cuda)
    q = torch.randn(1638, 32, 128, generator=g).to(cuda, torch.bfloat16)
    k = torch.randn(1638, 8, 128, generator=g).to(cuda, torch.bfloat16)
    positions = torch.randperm(32768, generator=g)[:1638].sort().values.to(cuda)
    cos, sin = rotary(q, positions[None, :])
    got = apply_rotary(q, k, cos[0], sin[0])
    want = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
    assert rel_error(got[0], want[0]) < 1e-2 and rel_error(got[1], want[1]) < 1e-2
