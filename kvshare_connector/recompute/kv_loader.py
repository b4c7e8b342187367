"""Stream reused K/V from host chunks into the engine's GPU buffers while it computes.

On a GPU the time to first token of a reused prompt is bounded by loading its KV and by
recomputing the selected tokens; done one after the other they add up. The loader
overlaps them: it copies the stored chunks host-to-device on a side stream a few layers
at a time, puts each layer's rows in place with
:func:`kvshare.kernels.rope_shift_scatter.rope_shift_scatter` (keys re-rotated to their
new positions) on that stream, and records one event per group of layers. The engine
calls :meth:`LayerwiseKVLoader.before_layer` before it touches a layer's rows; the compute
stream then waits for that layer's event, so layer ``l`` computes while layers ``> l``
are still arriving. No host synchronisation is involved.

Layers the engine overwrites before reading (below its first check layer, see
:attr:`SelectiveRecomputeEngine.first_reused_layer`) are not copied at all.

The chunks must be in pinned host memory for the copies to be asynchronous (from
pageable memory CUDA copies synchronously, which serialises loading and computing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvshare.kernels.rope_shift_scatter import KVDestination, rope_shift_scatter
from kvshare.recompute.engine import PromptKV


@dataclass(frozen=True)
class ReusedRows:
    """Where each reused row comes from and where it goes, one entry per row (int64).

    ``src_rows`` index the chunks handed to the loader as ``chunk * chunk_tokens + i``
    (token ``i`` of the ``chunk``-th chunk in the list); ``dst_positions`` are positions
    in the new prompt (distinct); ``deltas`` are new minus stored positions.
    """

    src_rows: np.ndarray
    dst_positions: np.ndarray
    deltas: np.ndarray

    @classmethod
    def from_runs(cls, runs: Sequence[tuple[int, int, int]], chunk_starts: Sequence[int],
                  chunk_tokens: int) -> ReusedRows:
        """Rows of runs ``(dst_start, src_start, length)`` of one source prompt.

        ``chunk_starts`` are the source positions where the loaded chunks begin, in the
        order they are handed to the loader (each a multiple of ``chunk_tokens``); every
        run must lie inside loaded chunks.
        """
        slot_of_chunk = {start // chunk_tokens: slot for slot, start in enumerate(chunk_starts)}
        dst = np.concatenate([np.arange(d, d + n) for d, _, n in runs] or [np.zeros(0)])
        src = np.concatenate([np.arange(s, s + n) for _, s, n in runs] or [np.zeros(0)])
        dst, src = dst.astype(np.int64), src.astype(np.int64)
        chunk = src // chunk_tokens
        missing = sorted(set(chunk.tolist()) - slot_of_chunk.keys())
        if missing:
            raise ValueError(f"runs need source chunks {missing[:8]} (of {chunk_tokens} tokens) "
                             f"that are not among the loaded chunks")
        slots = np.array([slot_of_chunk[c] for c in chunk.tolist()], dtype=np.int64)
        return cls(src_rows=slots * chunk_tokens + src % chunk_tokens, dst_positions=dst,
                   deltas=dst - src)


class LayerwiseKVLoader:
    """Copies chunks to a GPU ``PromptKV`` group by group of layers on a side stream.

    Args:
        chunks: host tensors ``[num_layers, 2, n, num_kv_heads, head_dim]`` in the stored
            chunk layout, pinned; every chunk holds ``chunk_tokens`` rows except possibly
            the last.
        rows: which chunk rows go where (:class:`ReusedRows`, ``chunk_tokens`` apart).
        inv_freq: the model's RoPE frequencies (:attr:`ModelAdapter.rope_inv_freq`).
        kv: the engine's buffers on the GPU; the loader writes ``rows.dst_positions`` of
            layers ``first_layer ..``.
        first_layer: layers below it are not loaded (``engine.first_reused_layer``).

    Layer groups double in size (1, 2, 4, ... layers from ``first_layer``): the first
    layer that reads reused rows waits for one layer's copy only, and the later groups,
    needed later, arrive while earlier layers compute, with few copy calls in all (one
    per chunk and group; each costs the host a few microseconds). The first group is
    issued at construction and one more at each :meth:`before_layer`, so the host's
    copy calls are spread between the engine's launches and are always ahead of the
    layer that needs them (group ``g`` starts at layer ``first_layer + 2**g - 1``).

    Call :meth:`before_layer` from the engine and :meth:`finish` after it; ``kv`` is
    complete once the current stream has passed :meth:`finish`.
    """

    def __init__(self, chunks: Sequence[torch.Tensor], rows: ReusedRows, chunk_tokens: int,
                 inv_freq: torch.Tensor, kv: PromptKV, first_layer: int) -> None:
        device = kv.keys.device
        num_layers = kv.keys.shape[0]
        if device.type != "cuda":
            raise ValueError(f"LayerwiseKVLoader streams to a CUDA device, got {device}")
        if not 0 <= first_layer <= num_layers:
            raise ValueError(f"first_layer={first_layer} outside [0, {num_layers}]")
        for i, chunk in enumerate(chunks):
            expected = (num_layers, 2, *kv.keys.shape[2:])
            if (chunk.dim() != 5 or (chunk.shape[0], chunk.shape[1], *chunk.shape[3:]) != expected
                    or chunk.dtype != kv.keys.dtype):
                raise ValueError(f"chunk {i} is {chunk.dtype} {tuple(chunk.shape)}; expected "
                                 f"{kv.keys.dtype} [{num_layers}, 2, n, *{tuple(expected[2:])}]")
            if chunk.shape[2] != chunk_tokens and i != len(chunks) - 1:
                raise ValueError(f"chunk {i} holds {chunk.shape[2]} rows; only the last may "
                                 f"hold fewer than chunk_tokens={chunk_tokens}")
        self._chunks = list(chunks)
        self._kv = kv
        self._first_layer = first_layer
        self._stream = torch.cuda.Stream(device)
        self._groups = _layer_groups(first_layer, num_layers)
        self._events = [torch.cuda.Event() for _ in self._groups]
        self._issued = 0
        # The side stream must not start before the buffers it writes exist.
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            self._staging = torch.empty(
                (len(chunks), num_layers - first_layer, 2, chunk_tokens, *kv.keys.shape[2:]),
                dtype=kv.keys.dtype, device=device)
            as_device = {"device": device, "non_blocking": True}
            self._src_rows = torch.from_numpy(rows.src_rows).to(**as_device)
            self._deltas = torch.from_numpy(rows.deltas).to(**as_device)
            self._dst_rows = torch.from_numpy(rows.dst_positions).to(**as_device)
            self._inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        for t in (kv.keys, kv.values):
            t.record_stream(self._stream)
        if self._groups:  # the GPU is idle until the engine's first launch: start now
            self._issue(0)

    def before_layer(self, layer: int) -> None:
        """Issue the next group; make the current stream wait for ``layer``'s rows."""
        if self._issued < len(self._groups):
            self._issue(self._issued)
        if layer >= self._first_layer:
            group = next(g for g, (start, end) in enumerate(self._groups) if start <= layer < end)
            while self._issued <= group:  # only if layers were skipped
                self._issue(self._issued)
            torch.cuda.current_stream(self._kv.keys.device).wait_event(self._events[group])

    def finish(self) -> None:
        """Issue what is left and make the current stream wait for every group."""
        while self._issued < len(self._groups):
            self._issue(self._issued)
        current = torch.cuda.current_stream(self._kv.keys.device)
        for event in self._events:
            current.wait_event(event)

    def _issue(self, group: int) -> None:
        start, end = self._groups[group]
        first = self._first_layer
        with torch.cuda.stream(self._stream):
            staged = self._staging[:, start - first:end - first]
            for slot, chunk in enumerate(self._chunks):
                # Full chunks land contiguously (one copy); a short last chunk goes
                # through PyTorch's strided path.
                staged[slot, :, :, :chunk.shape[2]].copy_(chunk[start:end], non_blocking=True)
            rope_shift_scatter(
                staged, self._src_rows, self._deltas, self._inv_freq,
                KVDestination(self._kv.keys[start:end], self._kv.values[start:end],
                              self._dst_rows))
            self._events[group].record(self._stream)
        self._issued += 1


def _layer_groups(first: int, num_layers: int) -> list[tuple[int, int]]:
    """``[start, end)`` layer ranges from ``first`` of 1, 2, 4, ... layers."""
    groups = []
    start, size = first, 1
    while start < num_layers:
        groups.append((start, min(start + size, num_layers)))
        start, size = start + size, 2 * size
    return groups
