"""The in-memory form of a stored KV chunk: layout, header, tensor.

A chunk holds K and V of every layer for a run of consecutive tokens of one prompt, as
one tensor of shape ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` (index 0 of
dim 1 is K, 1 is V). Keys are stored already rotated (RoPE) for positions
``start_pos .. start_pos + num_tokens - 1``: a chunk always covers contiguous positions,
so its start position is all the rotation state there is. Reusing it at other positions
means re-rotating by the delta (see the KV editor).

The wire form (magic, format version, codec, checksum) lives in ``codec.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvshare.storage.keys import KEY_BYTES, ChunkKey, chunk_keys, chunk_spans

# Wire codes of the dtypes a chunk may hold. Codes are part of the format: never reuse one.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
    torch.int8: 6,
    torch.uint8: 7,
    torch.float64: 8,
}
DTYPES_BY_CODE: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's KV across the model; equal layouts can share chunks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not 1 <= value < 1 << 16:
                raise ValueError(f"KVLayout.{name}={value} must be in [1, 65535]")
        if self.dtype not in DTYPE_CODES:
            raise ValueError(
                f"KVLayout.dtype={self.dtype} is not storable; expected one of "
                f"{', '.join(str(d) for d in DTYPE_CODES)}"
            )

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``."""
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.dtype.itemsize

    def bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize


@dataclass(frozen=True)
class ChunkHeader:
    """What a chunk is: which model, which tokens at which positions, what shape."""

    key: ChunkKey
    """Content-addressed key (``keys.chunk_key``); a stored chunk is only returned for it."""
    model_id: str
    layout: KVLayout
    start_pos: int
    """Position of the first token; keys are rotated for start_pos + i (contiguous)."""
    token_ids: tuple[int, ...]
    """The chunk's tokens; compared against the expected tokens before reuse."""

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"ChunkHeader.key must be {KEY_BYTES} bytes, got {len(self.key)}")
        if not self.token_ids:
            raise ValueError("ChunkHeader.token_ids is empty; a chunk holds at least one token")
        if self.start_pos < 0:
            raise ValueError(f"ChunkHeader.start_pos={self.start_pos} must be >= 0")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return self.layout.shape(self.num_tokens)


@dataclass(frozen=True)
class KVChunk:
    """A header and its KV tensor. Invariant: ``kv`` has ``header.shape`` and dtype."""

    header: ChunkHeader
    kv: torch.Tensor

    def __post_init__(self) -> None:
        if tuple(self.kv.shape) != self.header.shape:
            raise ValueError(
                f"KV shape {tuple(self.kv.shape)} does not match header shape {self.header.shape}"
                " ([num_layers, 2, num_tokens, num_kv_heads, head_dim])"
            )
        if self.kv.dtype != self.header.layout.dtype:
            raise ValueError(
                f"KV dtype {self.kv.dtype} does not match header dtype {self.header.layout.dtype}"
            )

    @property
    def key(self) -> ChunkKey:
        return self.header.key

    @property
    def nbytes(self) -> int:
        """Bytes of the KV tensor (the logical, uncompressed size)."""
        return self.kv.numel() * self.kv.element_size()


def split_prompt_kv(
    model_id: str, kv: torch.Tensor, token_ids: Sequence[int] | np.ndarray, chunk_tokens: int,
    *, scope: str, exact_tokens: int | None = None, variant: str = "",
) -> list[KVChunk]:
    """Cut a whole prompt's KV into keyed chunks (views of ``kv``, no copy).

    ``kv`` is ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` for tokens at
    positions ``0 .. num_tokens - 1``: keys chain from the first token, so the KV must
    start there too. Only the last chunk may be shorter than ``chunk_tokens``. ``scope``,
    ``exact_tokens`` and ``variant`` name the keys (see ``keys.chunk_keys``).
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[2] != len(ids):
        raise ValueError(
            f"KV tensor shape {tuple(kv.shape)} is not [num_layers, 2, num_tokens={len(ids)}, "
            "num_kv_heads, head_dim]"
        )
    layout = KVLayout(num_layers=kv.shape[0], num_kv_heads=kv.shape[3], head_dim=kv.shape[4],
                      dtype=kv.dtype)
    keys = chunk_keys(model_id, ids, chunk_tokens, scope=scope, exact_tokens=exact_tokens,
                      variant=variant)
    return [
        KVChunk(
            header=ChunkHeader(key=key, model_id=model_id, layout=layout, start_pos=start,
                               token_ids=tuple(ids[start:end].tolist())),
            kv=kv[:, :, start:end],
        )
        for key, (start, end) in zip(keys, chunk_spans(len(ids), chunk_tokens))
    ]
