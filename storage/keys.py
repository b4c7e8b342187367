"""Content-addressed chunk keys.

A chunk's key is ``xxh3_128(model id, key of the previous chunk, this chunk's token ids)``.
Chaining the previous key makes a key name the whole prefix, not only its own tokens:
two prompts share a chunk exactly when they share every token up to its end, which is
when its KV (a function of all earlier tokens) is identical. Keys are 16 bytes.

A hash is never trusted alone: chunks also carry their token ids, and the loader
compares them with the tokens it expected (see ``commit.fetch_entry_chunks``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import xxhash

ChunkKey = bytes
"""A 16-byte xxh3_128 digest; see the module docstring."""

KEY_BYTES = 16
ROOT_PARENT: ChunkKey = bytes(KEY_BYTES)
"""The "previous key" of a prompt's first chunk."""


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32, the form that is hashed and stored.

    Raises ValueError naming the first id outside [0, 2**32).
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    bad = (ids < 0) | (ids >= 1 << 32)
    if bad.any():
        raise ValueError(f"token id {int(ids[bad.argmax()])} is outside [0, 2**32)")
    return ids.astype("<u4").tobytes()


def chunk_key(model_id: str, parent: ChunkKey, token_ids: Sequence[int] | np.ndarray) -> ChunkKey:
    """Key of one chunk whose previous chunk has key ``parent`` (``ROOT_PARENT`` if first)."""
    if len(parent) != KEY_BYTES:
        raise ValueError(f"parent key must be {KEY_BYTES} bytes, got {len(parent)}")
    model = model_id.encode()
    # Length-prefix the model id so ("ab", tokens) and ("a", "b"+tokens) cannot collide.
    h = xxhash.xxh3_128(struct.pack("<I", len(model)) + model)
    h.update(parent)
    h.update(token_bytes(token_ids))
    return h.digest()


def chunk_spans(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` token spans of consecutive chunks; only the last may be short."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return [(s, min(s + chunk_tokens, num_tokens)) for s in range(0, num_tokens, chunk_tokens)]


def chunk_keys(
    model_id: str, token_ids: Sequence[int] | np.ndarray, chunk_tokens: int
) -> list[ChunkKey]:
    """The key chain of a token sequence cut into ``chunk_tokens``-token chunks."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    keys: list[ChunkKey] = []
    parent = ROOT_PARENT
    for start, end in chunk_spans(len(ids), chunk_tokens):
        parent = chunk_key(model_id, parent, ids[start:end])
        keys.append(parent)
    return keys
