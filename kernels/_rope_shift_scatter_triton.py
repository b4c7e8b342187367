"""Triton kernel of :func:`kvshare.kernels.rope_shift_scatter.rope_shift_scatter`.

One program moves ``BLOCK_R`` rows of one layer: it loads each row's K halves and V once,
rotates K in float32 and stores K and V to the dense destination and, when given, to the
paged one. Rows are 16-byte aligned runs of ``H * D`` elements, so loads and stores are
vectorised. The rotation ``delta * inv_freq`` is formed in float64 and in turns (the
launcher divides the frequencies by 2 pi), reduced to ``[-1/2, 1/2]`` turn, and only then
converted to a float32 angle for ``cos``/``sin``: deltas reach 1e5, where a float32 angle
would be off by about 1e-2 rad; this way it matches the reference's float64 angles to
about 1e-7.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvshare.kernels.rope_shift_scatter import KVDestination, check_inputs

_ELEMENTS_PER_PROGRAM = 8192
"""Elements of one K half-tile per program (rows x heads x half head dim), 16 rows of
Llama-3-8B's 8 x 128: 64 KB of K and V in flight per program. Measured on an H200 over
512 MiB of KV: 1 to 32 rows with 2, 4 and 8 warps ran at 0.19 to 0.73 of the device-copy
bandwidth; 16 rows with 8 warps was the fastest."""


@triton.jit
def _rope_shift_scatter_kernel(
    src, src_rows, deltas, turns_per_position,
    dense_k, dense_v, dense_rows,
    paged_k, paged_v, paged_rows,
    num_rows, rows_per_chunk,
    s_src_chunk, s_src_layer, s_src_kv, s_src_row,
    s_dense_k_layer, s_dense_v_layer, s_paged_k_layer, s_paged_v_layer,
    HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr,
    HAS_PAGED: tl.constexpr, BLOCK_R: tl.constexpr,
):
    layer = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < num_rows
    s = tl.load(src_rows + r, mask=row_ok, other=0)
    src_base = ((s // rows_per_chunk) * s_src_chunk + (s % rows_per_chunk) * s_src_row
                + layer * s_src_layer)

    j = tl.arange(0, HALF_P2)
    delta = tl.load(deltas + r, mask=row_ok, other=0).to(tl.float64)
    freq = tl.load(turns_per_position + j, mask=j < HALF, other=0.0)  # float64
    turns = delta[:, None] * freq[None, :]
    angle = (turns - tl.floor(turns + 0.5)).to(tl.float32) * 6.283185307179586
    cos = tl.cos(angle)[:, None, :]
    sin = tl.sin(angle)[:, None, :]

    h = tl.arange(0, HEADS_P2)
    # Offset of the first half of each head within a row; the second half is HALF further.
    inner = h[None, :, None] * (2 * HALF) + j[None, None, :]
    mask = row_ok[:, None, None] & (h < HEADS)[None, :, None] & (j < HALF)[None, None, :]
    k_ptr = src + src_base[:, None, None] + inner
    v_ptr = k_ptr + s_src_kv
    x1 = tl.load(k_ptr, mask=mask).to(tl.float32)
    x2 = tl.load(k_ptr + HALF, mask=mask).to(tl.float32)
    v1 = tl.load(v_ptr, mask=mask)
    v2 = tl.load(v_ptr + HALF, mask=mask)
    k1 = x1 * cos - x2 * sin
    k2 = x2 * cos + x1 * sin

    row_size: tl.constexpr = HEADS * 2 * HALF
    _store_rows(dense_k, dense_v, s_dense_k_layer, s_dense_v_layer, dense_rows, r, row_ok,
                layer, inner, mask, k1, k2, v1, v2, HALF, row_size)
    if HAS_PAGED:
        _store_rows(paged_k, paged_v, s_paged_k_layer, s_paged_v_layer, paged_rows, r, row_ok,
                    layer, inner, mask, k1, k2, v1, v2, HALF, row_size)


@triton.jit
def _store_rows(dst_k, dst_v, s_k_layer, s_v_layer, dst_rows, r, row_ok, layer, inner, mask,
                k1, k2, v1, v2, HALF: tl.constexpr, ROW_SIZE: tl.constexpr):
    """Write source row ``r``'s rotated keys and its values to destination row
    ``dst_rows[r]`` of one layer (rows given -1 are skipped), in the destination's dtype."""
    d = tl.load(dst_rows + r, mask=row_ok, other=-1)
    d_mask = mask & (d >= 0)[:, None, None]
    dk = dst_k + (layer * s_k_layer + d * ROW_SIZE)[:, None, None] + inner
    dv = dst_v + (layer * s_v_layer + d * ROW_SIZE)[:, None, None] + inner
    out_dtype = dst_k.dtype.element_ty
    tl.store(dk, k1.to(out_dtype), mask=d_mask)
    tl.store(dk + HALF, k2.to(out_dtype), mask=d_mask)
    tl.store(dv, v1.to(out_dtype), mask=d_mask)
    tl.store(dv + HALF, v2.to(out_dtype), mask=d_mask)

def rope_shift_scatter_triton(src: torch.Tensor, src_rows: torch.Tensor, deltas: torch.Tensor,
                              inv_freq: torch.Tensor, dense: KVDestination,
                              paged: KVDestination | None = None,
                              block_rows: int | None = None, num_warps: int = 8) -> None:
    """Launch the kernel on the current stream (arguments as in ``rope_shift_scatter``).

    ``block_rows`` (a power of two) and ``num_warps`` override the launch shape.
    """
    chunks = check_inputs(src, src_rows, deltas, inv_freq, dense, paged)
    num_rows = src_rows.shape[0]
    if num_rows == 0:
        return
    _, num_layers, _, rows_per_chunk, heads, head_dim = chunks.shape
    heads_p2 = triton.next_power_of_2(heads)
    half_p2 = triton.next_power_of_2(head_dim // 2)
    if block_rows is None:
        block_rows = max(1, _ELEMENTS_PER_PROGRAM // (heads_p2 * half_p2))
    target = paged if paged is not None else dense
    grid = (triton.cdiv(num_rows, block_rows), num_layers)
    _rope_shift_scatter_kernel[grid](
        chunks, src_rows, deltas,
        inv_freq.to(device=src.device, dtype=torch.float64) / (2 * math.pi),
        dense.keys, dense.values, dense.rows,
        target.keys, target.values, target.rows,
        num_rows, rows_per_chunk,
        chunks.stride(0), chunks.stride(1), chunks.stride(2), chunks.stride(3),
        dense.keys.stride(0), dense.values.stride(0), target.keys.stride(0),
        target.values.stride(0),
        HEADS=heads, HALF=head_dim // 2, HEADS_P2=heads_p2, HALF_P2=half_p2,
        HAS_PAGED=paged is not None, BLOCK_R=block_rows, num_warps=num_warps,
    )
