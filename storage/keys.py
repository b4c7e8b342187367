"""Content-addressed chunk keys, namespaced by sharing scope.

A chunk's key is ``xxh3_128(model id, scope, variant, key of the previous chunk, this
chunk's token ids)``. Chaining the previous key makes a key name the whole prefix, not
only its own tokens: two prompts of one scope share a chunk exactly when they share every
token up to its end, which is when its exactly computed KV (a function of all earlier
tokens) is identical. Keys are 16 bytes.

The scope (a tenant, or "" for the public scope) is part of every key, so chunk bytes
are shared across tenants only where the sharing policy lets one tenant read another
scope's entries. The variant is empty for exactly computed KV and names the entry
otherwise: KV filled from reused rows is an approximation, and giving it its own keys
means it can never answer a lookup for the exact KV of the same tokens.

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


def chunk_key(model_id: str, parent: ChunkKey, token_ids: Sequence[int] | np.ndarray, *,
              scope: str, variant: str = "") -> ChunkKey:
    """Key of one chunk whose previous chunk has key ``parent`` (``ROOT_PARENT`` if first).

    ``scope`` is the sharing scope of the entry the chunk belongs to; ``variant`` is ""
    for exactly computed KV (see the module docstring).
    """
    if len(parent) != KEY_BYTES:
        raise ValueError(f"parent key must be {KEY_BYTES} bytes, got {len(parent)}")
    h = xxhash.xxh3_128()
    # Length-prefix the strings so ("ab", tokens) and ("a", "b"+tokens) cannot collide.
    for name in (model_id, scope, variant):
        encoded = name.encode()
        h.update(struct.pack("<I", len(encoded)) + encoded)
    h.update(parent)
    h.update(token_bytes(token_ids))
    return h.digest()


def chunk_spans(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` token spans of consecutive chunks; only the last may be short."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return [(s, min(s + chunk_tokens, num_tokens)) for s in range(0, num_tokens, chunk_tokens)]


def chunk_keys(
    model_id: str, token_ids: Sequence[int] | np.ndarray, chunk_tokens: int, *, scope: str,
    exact_tokens: int | None = None, variant: str = "",
) -> list[ChunkKey]:
    """The key chain of a token sequence cut into ``chunk_tokens``-token chunks.

    Chunks that end within the first ``exact_tokens`` tokens (default: all) hold exactly
    computed KV and get content keys; every later chunk holds approximate KV and carries
    ``variant``, which must then be non-empty and unique to the entry.
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    exact = len(ids) if exact_tokens is None else exact_tokens
    if exact < len(ids) and not variant:
        raise ValueError(f"{len(ids) - exact} tokens hold approximate KV (exact_tokens="
                         f"{exact_tokens}); their chunks need a non-empty variant")
    keys: list[ChunkKey] = []
    parent = ROOT_PARENT
    for start, end in chunk_spans(len(ids), chunk_tokens):
        parent = chunk_key(model_id, parent, ids[start:end], scope=scope,
                           variant="" if end <= exact else variant)
        keys.append(parent)
    return keys
