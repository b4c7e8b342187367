"""Reused K/V rows into place: gather from loaded chunks, re-rotate keys, scatter K and V.

A prompt that reuses another prompt's K/V needs, for every reused row, the row taken
from the chunk buffer it was loaded into, its key re-rotated by the token's position
delta (neox RoPE, see :mod:`kvshare.recompute.rope`; values carry no position), and K
and V written where the new prompt wants them: the engine's dense per-request KV
(row = position) and, in the same pass, optionally a paged cache in vLLM's CUDA layout
(row = slot). Each source row is read once and written once per destination, so on a
GPU the kernel runs at memory speed.

Layouts (``L`` layers, ``H`` KV heads, ``D`` head dim; each ``[H, D]`` row contiguous):

* ``src``: ``[C, L, 2, n, H, D]``, ``C`` loaded chunks of ``n`` token rows each in the
  stored chunk layout (index 0 of dim 2 is K, 1 is V); a plain ``[L, 2, N, H, D]``
  buffer is the case ``C = 1``. Row ``c * n + i`` is token ``i`` of chunk ``c``.
* dense destination: ``keys``/``values`` ``[L, T, H, D]`` (:class:`PromptKV` buffers).
* paged destination: vLLM's per-layer ``key_cache``/``value_cache``
  ``[num_blocks, block_size, H, D]``, stacked over layers (any layer stride, e.g. views
  into one allocation as vLLM >= 0.29 makes them); slot ``= block * block_size + offset``.
  Negative slots are skipped (vLLM pads slot mappings with -1).

:func:`rope_shift_scatter` runs the Triton kernel on CUDA tensors and
:func:`rope_shift_scatter_reference` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshare.recompute.rope import rerotate_keys


@dataclass(frozen=True)
class KVDestination:
    """Where the rows go: ``keys``/``values`` ``[L, rows, H, D]`` and one row index per source row.

    Invariants: ``keys`` and ``values`` have the same shape, dtype and device; each
    layer's ``[rows, H, D]`` is contiguous (the layer stride is free); ``rows`` are
    distinct (two source rows written to one destination row race).
    """

    keys: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor
    """int64 ``[R]``: destination row of each source row; negative rows are skipped."""

    @classmethod
    def paged(cls, key_cache: torch.Tensor, value_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> KVDestination:
        """vLLM's paged layout ``[L, num_blocks, block_size, H, D]`` (K and V separate)."""
        for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
            if cache.dim() != 5:
                raise ValueError(f"{name} must be [L, num_blocks, block_size, H, D], "
                                 f"got shape {tuple(cache.shape)}")
        num_layers, num_blocks, block_size = key_cache.shape[:3]
        rows = num_blocks * block_size
        return cls(keys=key_cache.view(num_layers, rows, *key_cache.shape[3:]),
                   values=value_cache.view(num_layers, rows, *value_cache.shape[3:]),
                   rows=slot_mapping)


def rope_shift_scatter(src: torch.Tensor, src_rows: torch.Tensor, deltas: torch.Tensor,
                       inv_freq: torch.Tensor, dense: KVDestination,
                       paged: KVDestination | None = None) -> None:
    """Copy rows ``src_rows`` of ``src`` into ``dense`` (and ``paged``), keys re-rotated.

    Args:
        src: ``[C, L, 2, n, H, D]`` or ``[L, 2, N, H, D]`` (module docstring).
        src_rows: int64 ``[R]``, rows of ``src`` to take (``c * n + i``).
        deltas: int64 ``[R]``, new position minus stored position of each row.
        inv_freq: float32 ``[D // 2]``, the model's RoPE frequencies without attention
            scaling (:attr:`ModelAdapter.rope_inv_freq`).
        dense: destination ``[L, T, H, D]`` with ``rows`` = positions.
        paged: optional second destination, e.g. :meth:`KVDestination.paged`.

    The Triton kernel runs when ``src`` is on CUDA; elsewhere the PyTorch reference.
    """
    if src.is_cuda:
        from kvshare.kernels._rope_shift_scatter_triton import rope_shift_scatter_triton

        rope_shift_scatter_triton(src, src_rows, deltas, inv_freq, dense, paged)
    else:
        rope_shift_scatter_reference(src, src_rows, deltas, inv_freq, dense, paged)


def rope_shift_scatter_reference(src: torch.Tensor, src_rows: torch.Tensor,
                                 deltas: torch.Tensor, inv_freq: torch.Tensor,
                                 dense: KVDestination, paged: KVDestination | None = None) -> None:
    """:func:`rope_shift_scatter` in PyTorch: gather, :func:`rerotate_keys`, index writes."""
    chunks = check_inputs(src, src_rows, deltas, inv_freq, dense, paged)
    rows_per_chunk = chunks.shape[3]
    # Advanced indices split by slices: the indexed dim comes first, [R, L, 2, H, D].
    rows = chunks[src_rows // rows_per_chunk, :, :, src_rows % rows_per_chunk]
    keys = rerotate_keys(rows[:, :, 0].transpose(0, 1), deltas, inv_freq)  # [L, R, H, D]
    values = rows[:, :, 1].transpose(0, 1)
    for destination in (dense, paged):
        if destination is None:
            continue
        keep = destination.rows >= 0
        target_rows = destination.rows[keep]
        destination.keys[:, target_rows] = keys[:, keep].to(destination.keys.dtype)
        destination.values[:, target_rows] = values[:, keep].to(destination.values.dtype)


def check_inputs(src: torch.Tensor, src_rows: torch.Tensor, deltas: torch.Tensor,
                 inv_freq: torch.Tensor, dense: KVDestination,
                 paged: KVDestination | None) -> torch.Tensor:
    """Validate shapes, dtypes and devices; return ``src`` as ``[C, L, 2, n, H, D]``."""
    chunks = src.unsqueeze(0) if src.dim() == 5 else src
    if chunks.dim() != 6 or chunks.shape[2] != 2:
        raise ValueError(f"src must be [C, L, 2, n, H, D] or [L, 2, N, H, D], "
                         f"got shape {tuple(src.shape)}")
    _, num_layers, _, _, heads, head_dim = chunks.shape
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for neox RoPE")
    if chunks.stride(-1) != 1 or chunks.stride(-2) != head_dim:
        raise ValueError("each src row [H, D] must be contiguous")
    num_rows = src_rows.shape[0]
    for name, index in (("src_rows", src_rows), ("deltas", deltas)):
        if index.dtype != torch.int64 or index.shape != (num_rows,):
            raise ValueError(f"{name} must be int64 [{num_rows}], got {index.dtype} "
                             f"{tuple(index.shape)}")
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}, "
                         f"expected ({head_dim // 2},) for head_dim {head_dim}")
    for label, destination in (("dense", dense), ("paged", paged)):
        if destination is None:
            continue
        keys, values = destination.keys, destination.values
        expected = (num_layers, heads, head_dim)
        if (keys.dim() != 4 or (keys.shape[0], *keys.shape[2:]) != expected
                or values.shape != keys.shape):
            raise ValueError(f"{label} keys/values must be [L={num_layers}, rows, H={heads}, "
                             f"D={head_dim}], got {tuple(keys.shape)} and {tuple(values.shape)}")
        for t in (keys, values):
            if t.stride(-1) != 1 or t.stride(-2) != head_dim or t.stride(-3) != heads * head_dim:
                raise ValueError(f"{label} keys/values: each layer's [rows, H, D] must be "
                                 f"contiguous, got strides {t.stride()}")
        if destination.rows.dtype != torch.int64 or destination.rows.shape != (num_rows,):
            raise ValueError(f"{label} rows must be int64 [{num_rows}], got "
                             f"{destination.rows.dtype} {tuple(destination.rows.shape)}")
        devices = {t.device for t in (src, src_rows, deltas, keys, values, destination.rows)}
        if len(devices) != 1:
            raise ValueError(f"{label}: all tensors must be on one device, got {devices}")
    return chunks
