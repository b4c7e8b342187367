"""Neox RoPE applied to a layer's queries and keys in one launch, with transformers' roundings.

transformers' ``apply_rotary_pos_emb`` computes ``x * cos + rotate_half(x) * sin`` for
queries and keys as about ten kernels (slices, negation, concatenation, products, sums);
for the rows selective recompute tracks, launching them costs more than running them.
The Triton kernel rotates every head of a token's queries and keys in one program and
rounds where PyTorch rounds (each product and the sum, to the model dtype). In Triton's
interpreter its float32/float16 results equal transformers' bit for bit. Compiled for an
H200 they do not: on 4096 tokens of Llama-3-8B's 32 heads, 18% of the bf16 query
elements were one rounding apart (largest difference 0.031), consistent with the
compiler keeping the products in float32 for the sum; the tests bound the relative error
(under 1e-2, as for every bf16 kernel here).

``cos``/``sin`` are ``[n, D]`` as a transformers rotary embedding returns them (both halves
of a row repeat the frequencies; attention scaling already folded in).

:func:`apply_rotary` runs the kernel on CUDA and :func:`apply_rotary_reference`
(transformers' arithmetic) elsewhere.
"""

from __future__ import annotations

import torch


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of ``q`` ``[n, Hq, D]`` and ``k`` ``[n, Hkv, D]`` (half-split pairs)."""
    if q.is_cuda:
        from kvshare.kernels._rotary_triton import apply_rotary_triton

        return apply_rotary_triton(q, k, cos, sin)
    return apply_rotary_reference(q, k, cos, sin)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``."""
    check_inputs(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be [n, Hq, D] and k [n, Hkv, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    expected = (q.shape[0], q.shape[2])
    if cos.shape != expected or sin.shape != expected or q.shape[2] % 2:
        raise ValueError(f"cos and sin must be [n, D] = {expected} with D even, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
