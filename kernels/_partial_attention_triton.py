"""Triton kernel of :func:`kvshare.kernels.partial_attention.partial_attention`.

FlashAttention-style forward (online softmax in float32, ``exp2``), one program per
(block of ``BLOCK_M`` query tokens, request, KV head). The tile's rows are the
``BLOCK_M x GROUP`` (token, query head) pairs of that KV head, so each K/V tile loaded
serves all of its query heads (GQA). Queries are sorted by position within a request,
so the block's first and last positions bound its work: key blocks wholly at or before
the first position need no mask, key blocks after the last position are skipped, and
only the blocks in between are masked per (row, key). Programs take query blocks in
reverse order, latest positions (most keys) first, which evens out the tail of the
launch.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kvshare.kernels.partial_attention import check_inputs

_MASKED = -1.0e30
"""Score of a masked (row, key): finite, so a row that sees no key of a block yields
exp2(0) = 1 only while its running max is also _MASKED, which happens only for padding
rows past a request's last query (never stored). Every real row sees key 0 in the first
block it visits, so its max is a real score from then on."""


@triton.jit
def _attend_block(q, k_ptrs, v_ptrs, acc, m_i, l_i, key_start, pos, num_keys, qk_scale,
                  MASKED_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    n = key_start + tl.arange(0, BLOCK_N)
    if MASKED_BLOCK:
        k = tl.load(k_ptrs, mask=(n < num_keys)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED_BLOCK:
        qk = tl.where(n[None, :] <= pos[:, None], qk, MASKED)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED_BLOCK:
        v = tl.load(v_ptrs, mask=(n < num_keys)[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _partial_attention_kernel(
    Q, K, V, Out, QPos, CuQ, CuK, single_num_q, single_num_keys,
    s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, s_on, s_oh,
    num_kv_heads, qk_scale,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, VARLEN: tl.constexpr,
):
    kv_head = tl.program_id(1) % num_kv_heads
    if VARLEN:
        req = tl.program_id(1) // num_kv_heads
        q_begin = tl.load(CuQ + req)
        num_q = tl.load(CuQ + req + 1) - q_begin
        k_begin = tl.load(CuK + req).to(tl.int64)
        num_keys = tl.load(CuK + req + 1) - k_begin
    else:  # one request: its sizes come as arguments, no offsets to upload per call
        q_begin = 0
        num_q = single_num_q
        k_begin = tl.zeros([], tl.int64)
        num_keys = single_num_keys
    num_blocks = tl.cdiv(num_q, BLOCK_M)
    if tl.program_id(0) >= num_blocks:
        return
    block = num_blocks - 1 - tl.program_id(0)

    rows = tl.arange(0, BLOCK_M * GROUP_P2)
    token = block * BLOCK_M + rows // GROUP_P2
    group = rows % GROUP_P2
    row_ok = (token < num_q) & (group < GROUP)
    head = kv_head * GROUP + group
    q_row = (q_begin + token).to(tl.int64)
    pos = tl.load(QPos + q_begin + token, mask=token < num_q, other=-1)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + q_row[:, None] * s_qn + head[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)

    first_pos = tl.load(QPos + q_begin + block * BLOCK_M)
    last_pos = tl.load(QPos + q_begin + tl.minimum(block * BLOCK_M + BLOCK_M, num_q) - 1)
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys every row of the block sees
    end = tl.minimum(last_pos + 1, num_keys)

    m_i = tl.full([BLOCK_M * GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_P2], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_P2, HEAD_DIM], tl.float32)
    n = tl.arange(0, BLOCK_N)
    k_ptrs = K + (k_begin + n)[:, None] * s_kn + kv_head * s_kh + d[None, :]
    v_ptrs = V + (k_begin + n)[:, None] * s_vn + kv_head * s_vh + d[None, :]
    for key_start in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(q, k_ptrs + key_start * s_kn, v_ptrs + key_start * s_vn,
                                      acc, m_i, l_i, key_start, pos, num_keys, qk_scale,
                                      False, BLOCK_N, MASKED)
    for key_start in range(unmasked_end, end, BLOCK_N):
        acc, m_i, l_i = _attend_block(q, k_ptrs + key_start * s_kn, v_ptrs + key_start * s_vn,
                                      acc, m_i, l_i, key_start, pos, num_keys, qk_scale,
                                      True, BLOCK_N, MASKED)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + q_row[:, None] * s_on + head[:, None] * s_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def launch_shape(num_q: int, num_kv_heads: int, group: int, head_dim: int,
                 device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch.

    Tiles of 128 (token, head) rows by 64 keys; a launch with too few query blocks to
    fill the multiprocessors twice uses 64-row tiles instead.
    """
    group_p2 = triton.next_power_of_2(group)
    rows = 128
    if device.type == "cuda" and (
            triton.cdiv(num_q * group_p2, rows) * num_kv_heads < 2 * _multiprocessors(device)):
        rows = 64
    block_m = max(1, rows // group_p2)
    num_warps = 8 if block_m * group_p2 >= 128 else 4
    return block_m, 64 if head_dim <= 128 else 32, num_warps, 3


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def partial_attention_triton(q: torch.Tensor, q_positions: torch.Tensor, keys: torch.Tensor,
                             values: torch.Tensor, scale: float,
                             cu_seqlens_q: torch.Tensor | None = None,
                             cu_seqlens_k: torch.Tensor | None = None,
                             max_seqlen_q: int | None = None,
                             config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Launch the kernel on the current stream (arguments as in ``partial_attention``).

    ``config`` overrides :func:`launch_shape` (for tuning).
    """
    check_inputs(q, q_positions, keys, values, cu_seqlens_q, cu_seqlens_k)
    num_q, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    for name, t in (("q", q), ("keys", keys), ("values", values)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    varlen = cu_seqlens_q is not None
    if not varlen:
        max_seqlen_q = num_q
    elif max_seqlen_q is None:
        raise ValueError("max_seqlen_q is required with cu_seqlens_q")
    out = torch.empty_like(q)
    if num_q == 0:
        return out
    group = num_heads // num_kv_heads
    block_m, block_n, num_warps, num_stages = config or launch_shape(
        max_seqlen_q, num_kv_heads, group, head_dim, q.device)
    num_requests = cu_seqlens_q.numel() - 1 if varlen else 1
    grid = (triton.cdiv(max_seqlen_q, block_m), num_requests * num_kv_heads)
    _partial_attention_kernel[grid](
        q, keys, values, out, q_positions,
        cu_seqlens_q if varlen else q_positions, cu_seqlens_k if varlen else q_positions,
        num_q, keys.shape[0],
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1), out.stride(0), out.stride(1),
        num_kv_heads, scale * math.log2(math.e),
        GROUP=group, GROUP_P2=triton.next_power_of_2(group), HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, MASKED=_MASKED, VARLEN=varlen,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
