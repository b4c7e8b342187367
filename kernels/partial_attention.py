"""Attention of selected query tokens over a request's whole KV, causal by position.

Selective recompute runs each layer for a subset of a prompt's tokens (placeholders,
boundaries, the tokens DHD picked) scattered over the prompt, while their attention
must see every K/V row up to their own position. FlashAttention's causal mask aligns
queries to the end of the keys and cannot express that; SDPA can only with an explicit
``[n, T]`` boolean mask, which it reads in full and which rules out its fused kernels
with grouped-query heads. The Triton kernel masks by position itself, skips key blocks
past the last query of each query block, shares each K/V tile among a KV head's query
heads (GQA), and takes several requests per launch (varlen, like
``flash_attn_varlen_func``).

Layouts (``Hq`` query heads, ``Hkv`` KV heads dividing ``Hq``, ``D`` head dim):

* ``q``: ``[N, Hq, D]``, the selected queries of every request back to back, post-RoPE;
* ``q_positions``: int64 ``[N]``, each query's position in its request, strictly
  increasing within a request;
* ``keys``/``values``: ``[T_total, Hkv, D]``, every request's K/V back to back, row ``p``
  of a request being its position ``p``;
* ``cu_seqlens_q``/``cu_seqlens_k``: int32 ``[B + 1]`` offsets of each request's queries
  and keys (omit both for one request);
* result: ``[N, Hq, D]``. Query ``i`` of request ``b`` attends to that request's rows
  ``0 .. q_positions[i]``.

:func:`partial_attention` runs the Triton kernel on CUDA (head dims that are powers of
two from 16 to 256) and :func:`partial_attention_reference`, SDPA with a boolean mask,
elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def partial_attention(q: torch.Tensor, q_positions: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, scale: float,
                      cu_seqlens_q: torch.Tensor | None = None,
                      cu_seqlens_k: torch.Tensor | None = None,
                      max_seqlen_q: int | None = None) -> torch.Tensor:
    """Causal-by-position attention of selected queries (see the module docstring).

    ``max_seqlen_q`` is the largest number of queries of one request (needed with
    ``cu_seqlens_q`` on CUDA to size the launch without reading the offsets back).
    """
    if q.is_cuda and kernel_supports(q.shape[-1]):
        from kvshare.kernels._partial_attention_triton import partial_attention_triton

        return partial_attention_triton(q, q_positions, keys, values, scale,
                                        cu_seqlens_q, cu_seqlens_k, max_seqlen_q)
    return partial_attention_reference(q, q_positions, keys, values, scale,
                                       cu_seqlens_q, cu_seqlens_k)


def kernel_supports(head_dim: int) -> bool:
    """Head dims the Triton kernel handles (a power of two that ``tl.dot`` takes)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def partial_attention_reference(q: torch.Tensor, q_positions: torch.Tensor,
                                keys: torch.Tensor, values: torch.Tensor, scale: float,
                                cu_seqlens_q: torch.Tensor | None = None,
                                cu_seqlens_k: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`partial_attention` as SDPA with an explicit ``[n, T]`` mask, one request at a time."""
    check_inputs(q, q_positions, keys, values, cu_seqlens_q, cu_seqlens_k)
    if cu_seqlens_q is None:
        return _sdpa_with_position_mask(q, q_positions, keys, values, scale)
    q_bounds = cu_seqlens_q.tolist()
    k_bounds = cu_seqlens_k.tolist()
    out = torch.empty_like(q)
    for (q0, q1), (k0, k1) in zip(zip(q_bounds, q_bounds[1:]), zip(k_bounds, k_bounds[1:])):
        if q1 > q0:
            out[q0:q1] = _sdpa_with_position_mask(q[q0:q1], q_positions[q0:q1], keys[k0:k1],
                                                  values[k0:k1], scale)
    return out


def _sdpa_with_position_mask(q: torch.Tensor, q_positions: torch.Tensor, keys: torch.Tensor,
                             values: torch.Tensor, scale: float) -> torch.Tensor:
    key_positions = torch.arange(keys.shape[0], device=keys.device)
    mask = key_positions[None, :] <= q_positions[:, None]  # [n, T], True = may attend
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, Hq, n, D]
        keys.transpose(0, 1)[None],  # [1, Hkv, T, D]
        values.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )
    return out[0].transpose(0, 1)


def check_inputs(q: torch.Tensor, q_positions: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                 cu_seqlens_k: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices (values of positions and offsets are the caller's duty)."""
    if q.dim() != 3 or keys.dim() != 3 or values.shape != keys.shape:
        raise ValueError(f"q must be [N, Hq, D] and keys/values [T, Hkv, D], got "
                         f"{tuple(q.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    if q.shape[2] != keys.shape[2] or q.shape[1] % keys.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of KV heads "
                         f"{keys.shape[1]} with equal head dims ({q.shape[2]} vs {keys.shape[2]})")
    if q.dtype != keys.dtype or values.dtype != keys.dtype:
        raise ValueError(f"q, keys and values must share a dtype, got {q.dtype}, "
                         f"{keys.dtype}, {values.dtype}")
    if q_positions.shape != (q.shape[0],) or q_positions.dtype != torch.int64:
        raise ValueError(f"q_positions must be int64 [{q.shape[0]}], got "
                         f"{q_positions.dtype} {tuple(q_positions.shape)}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k, or neither")
    if cu_seqlens_q is not None and (cu_seqlens_q.shape != cu_seqlens_k.shape
                                     or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 2):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [B + 1], got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    tensors = [q, q_positions, keys, values]
    if cu_seqlens_q is not None:
        tensors += [cu_seqlens_q, cu_seqlens_k]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
