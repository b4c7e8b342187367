"""Entry commit, entry load and reconciliation: where the index meets the chunk store.

Commit order is the invariant "no index entry points at nothing (at commit time)":
chunks are stored first, then checked to be held by at least one tier, and only entries
whose every chunk passed are added to the index, in one ``add`` call.

Chunks can still disappear later (LRU eviction, TTL, a flushed Redis, a CPU tier that
died with its process). Loading is therefore partial by design: it returns whatever
verified KV it could fetch and a per-token mask; the tokens of missing, corrupt or
mismatching chunks are simply recomputed by the engine, as if they had never been
cached. Entries whose chunks are gone are found by loads and by
:func:`entries_missing_chunks` (at start-up), and their owner deletes them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch

from kvshare.storage.chunk import KVChunk, KVLayout
from kvshare.storage.index import IndexDamagedError, stored_chunk_keys
from kvshare.storage.keys import ChunkKey, chunk_spans
from kvshare.storage.tiered_store import ChunkStore, TieredStore

logger = logging.getLogger(__name__)

E = TypeVar("E")
E_contra = TypeVar("E_contra", contravariant=True)


class EntrySink(Protocol[E_contra]):
    """What commit needs of the index (``kvshare.storage.index.EntryIndex`` fits)."""

    def add(self, entries: list[E_contra]) -> object: ...


class ChunkSource(Protocol):
    """What loads need of a store (``TieredStore`` fits, and stores in front of it)."""

    def get(self, keys: list[ChunkKey]) -> list[KVChunk | None]: ...


def commit_entries(store: TieredStore, index: EntrySink[E],
                   pending: Sequence[tuple[E, Sequence[KVChunk]]]) -> list[bool]:
    """Store each entry's chunks, then add the entries whose chunks are all held.

    Returns, per entry, whether it was added. Chunks shared by several entries (a
    common prefix) are stored once. ``index.add`` is called at most once.
    """
    for entry, chunks in pending:
        if not chunks:
            raise ValueError(f"entry {entry!r} has no chunks; an entry must point at its KV")
    unique = {chunk.key: chunk for _, chunks in pending for chunk in chunks}
    store.put(list(unique.values()))
    # Checked after all puts: a small tier may have evicted early chunks of this batch.
    held = dict(zip(unique, store.contains(list(unique))))
    committed = [all(held[chunk.key] for chunk in chunks) for _, chunks in pending]
    entries = [entry for (entry, _), ok in zip(pending, committed) if ok]
    if len(entries) < len(pending):
        logger.warning("kvshare: %d of %d entries not indexed (chunks not stored)",
                       len(pending) - len(entries), len(pending))
    if entries:
        index.add(entries)
    return committed


@dataclass
class LoadedKV:
    """KV of one entry as far as the tiers could supply it."""

    kv: torch.Tensor
    """``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``; zero where not available."""
    available: torch.Tensor
    """``bool[num_tokens]``: True where ``kv`` holds verified stored KV, False where the
    token must be recomputed."""

    @property
    def num_available(self) -> int:
        return int(self.available.sum())


def fetch_entry_chunks(store: ChunkSource, keys: Sequence[ChunkKey],
                       token_ids: Sequence[int] | np.ndarray, chunk_tokens: int,
                       layout: KVLayout, chunks: Sequence[int] | None = None,
                       model_id: str | None = None) -> dict[int, KVChunk]:
    """Fetch an entry's chunks and keep the ones that verify: chunk index -> chunk.

    ``keys`` are the entry's chunk keys for ``token_ids`` cut every ``chunk_tokens``
    tokens; ``chunks`` names the chunk indices to fetch (default: all). A fetched chunk
    is kept only if its tokens, start position, layout and (given ``model_id``) model are
    the expected ones (the hash is not trusted alone). Chunk ``i`` covers tokens
    ``[i * chunk_tokens, ...)``.
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    spans = chunk_spans(len(ids), chunk_tokens)
    if len(keys) != len(spans):
        raise ValueError(f"{len(keys)} chunk keys for {len(ids)} tokens in chunks of "
                         f"{chunk_tokens}; expected {len(spans)} keys")
    wanted = range(len(spans)) if chunks is None else sorted(set(chunks))
    if wanted and not 0 <= wanted[0] <= wanted[-1] < len(spans):
        raise ValueError(f"chunk indices {list(wanted)} out of range for {len(spans)} chunks")
    verified: dict[int, KVChunk] = {}
    for index, chunk in zip(wanted, store.get([keys[i] for i in wanted])):
        if chunk is None:
            continue
        start, end = spans[index]
        header = chunk.header
        if (header.layout != layout or header.start_pos != start
                or header.token_ids != tuple(ids[start:end].tolist())
                or (model_id is not None and header.model_id != model_id)):
            logger.warning("kvshare: chunk %s does not match its entry (tokens %d..%d); "
                           "recomputing them", header.key.hex(), start, end)
            continue
        verified[index] = chunk
    return verified


def load_entry_kv(store: TieredStore, keys: Sequence[ChunkKey],
                  token_ids: Sequence[int] | np.ndarray, chunk_tokens: int, layout: KVLayout,
                  device: str | torch.device = "cpu",
                  chunks: Sequence[int] | None = None) -> LoadedKV:
    """An entry's KV assembled from its verified chunks (:func:`fetch_entry_chunks`),
    with an availability mask; the tokens of chunks not fetched or not held stay
    unavailable."""
    num_tokens = len(token_ids)
    kv = torch.zeros(layout.shape(num_tokens), dtype=layout.dtype, device=device)
    available = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    for index, chunk in fetch_entry_chunks(store, keys, token_ids, chunk_tokens, layout,
                                           chunks).items():
        start = index * chunk_tokens
        end = start + chunk.kv.shape[2]
        kv[:, :, start:end].copy_(chunk.kv)
        available[start:end] = True
    return LoadedKV(kv=kv, available=available)


def entries_missing_chunks(store: TieredStore, chunk_keys: dict[str, Sequence[str]],
                           batch_entries: int = 1024) -> set[str]:
    """Ids of the entries (id -> hex chunk keys) some of whose chunks ``store`` lacks.

    Asks the tiers in batches of ``batch_entries`` entries, so a large index is checked
    with few round trips and bounded memory.
    """
    missing: set[str] = set()
    items = list(chunk_keys.items())
    for start in range(0, len(items), batch_entries):
        batch = items[start:start + batch_entries]
        keys = list({bytes.fromhex(key) for _, keys in batch for key in keys})
        held = dict(zip(keys, store.contains(keys)))
        missing.update(entry_id for entry_id, keys in batch
                       if not keys or not all(held[bytes.fromhex(key)] for key in keys))
    return missing


def lost_entries(store: ChunkStore, index_dir: Path) -> set[str]:
    """Ids of the durable entries under ``index_dir`` whose chunks ``store`` lost.

    Run at start-up by the index's owner. A failure of the check itself answers "none"
    (entries with lost chunks are then dropped when a load finds them), and so does a
    tier failing during the check (Redis down at start-up): its chunks may be back with
    it, so "not found" proves nothing then. A damaged index is the business of whoever
    opens it for writing (it moves the directory aside and says so), not of this check.
    """
    errors_before = _tier_errors(store)
    try:
        missing = entries_missing_chunks(store, stored_chunk_keys(index_dir))
    except IndexDamagedError as exc:
        logger.debug("kvshare: no start-up check of the index against the tiers: %s", exc)
        return set()
    except Exception:
        logger.exception("kvshare: checking the index against the tiers failed; entries "
                         "with lost chunks are dropped when a load finds them")
        return set()
    if missing and _tier_errors(store) != errors_before:
        logger.warning("kvshare: a tier failed while the index was checked against the "
                       "tiers; keeping the %d entries it did not find", len(missing))
        return set()
    if missing:
        logger.warning("kvshare: %d index entries lost their chunks since the index was "
                       "written; dropping them", len(missing))
    return missing


def _tier_errors(store: ChunkStore) -> int:
    """Backend failures counted by all of ``store``'s tiers so far."""
    return sum(stats.errors for stats in store.stats().values())
