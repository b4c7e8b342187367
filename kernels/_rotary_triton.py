"""Triton kernel of :func:`kvshare.kernels.rotary.apply_rotary`: one token per program."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvshare.kernels.rotary import check_inputs


@triton.jit
def _rotate_token(x, out, row, c1, c2, s1, s2, s_xn, s_xh, s_on, s_oh,
                  HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_P2: tl.constexpr,
                  HALF_P2: tl.constexpr):
    h = tl.arange(0, HEADS_P2)[:, None]
    j = tl.arange(0, HALF_P2)[None, :]
    mask = (h < HEADS) & (j < HALF)
    src = x + row * s_xn + h * s_xh + j
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    # x * cos + rotate_half(x) * sin, each product and the sum rounded as PyTorch does.
    first = ((x1.to(tl.float32) * c1).to(dtype).to(tl.float32)
             + (-x2.to(tl.float32) * s1).to(dtype).to(tl.float32)).to(dtype)
    second = ((x2.to(tl.float32) * c2).to(dtype).to(tl.float32)
              + (x1.to(tl.float32) * s2).to(dtype).to(tl.float32)).to(dtype)
    dst = out + row * s_on + h * s_oh + j
    tl.store(dst, first, mask=mask)
    tl.store(dst + HALF, second, mask=mask)


@triton.jit
def _rotary_kernel(q, k, q_out, k_out, cos, sin, s_qn, s_qh, s_kn, s_kh, s_qon, s_qoh,
                   s_kon, s_koh, s_cos, s_sin,
                   Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr,
                   Q_HEADS_P2: tl.constexpr, K_HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF_P2)[None, :]
    jm = j < HALF
    c1 = tl.load(cos + row * s_cos + j, mask=jm, other=0.0).to(tl.float32)
    c2 = tl.load(cos + row * s_cos + HALF + j, mask=jm, other=0.0).to(tl.float32)
    s1 = tl.load(sin + row * s_sin + j, mask=jm, other=0.0).to(tl.float32)
    s2 = tl.load(sin + row * s_sin + HALF + j, mask=jm, other=0.0).to(tl.float32)
    _rotate_token(q, q_out, row, c1, c2, s1, s2, s_qn, s_qh, s_qon, s_qoh,
                  Q_HEADS, HALF, Q_HEADS_P2, HALF_P2)
    _rotate_token(k, k_out, row, c1, c2, s1, s2, s_kn, s_kh, s_kon, s_koh,
                  K_HEADS, HALF, K_HEADS_P2, HALF_P2)


def apply_rotary_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on the current stream (arguments as in ``apply_rotary``)."""
    check_inputs(q, k, cos, sin)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    n, q_heads, dim = q.shape
    if n == 0:
        return q_out, k_out
    k_heads = k.shape[1]
    _rotary_kernel[(n,)](
        q, k, q_out, k_out, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0), sin.stride(0),
        Q_HEADS=q_heads, K_HEADS=k_heads, HALF=dim // 2,
        Q_HEADS_P2=triton.next_power_of_2(q_heads), K_HEADS_P2=triton.next_power_of_2(k_heads),
        HALF_P2=triton.next_power_of_2(dim // 2), num_warps=4,
    )
    return q_out, k_out
