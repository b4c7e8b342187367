"""The entry index: which earlier prompts exist, in which scope, and where their KV lives.

LanceDB holds the durable table (one row per entry: id, model, scope, embedding, token
ids, preview, times, hit count, chunk keys). The lookup hot path never queries it: a
LanceDB filtered vector query costs 7-20 ms on two cores even with an IVF-PQ index,
while kvshare's whole lookup budget is 5 ms at p50. So the index keeps a RAM mirror,
loaded at open and updated on every write, with one vector index per (model, scope)
partition: exact inner product while small, IVF (faiss) once a partition passes
``ann_min_rows``. Token ids live in that mirror too; they cost 4 bytes a token, about
0.02% of the KV they index (SmolLM2: 23 KiB a token).

Invariants:
- one writer process per directory (LanceDB appends and deletes from several processes
  conflict); within the process every method is thread-safe;
- an entry is searchable as soon as ``add`` returns and durable after the next
  ``flush`` (automatic every ``flush_rows`` adds, and on ``close``): a crash loses at
  most the unflushed tail, which is a cache miss, never a wrong answer;
- search never returns an entry of another model or of a scope not asked for.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

TABLE_NAME = "entries"
PREVIEW_CHARS = 200


def new_entry_id() -> str:
    return uuid.uuid4().hex


@dataclass
class IndexEntry:
    """One stored prompt."""

    entry_id: str
    model_id: str
    scope: str
    """Sharing scope: a tenant name, or "" for the public (unsalted) scope."""
    embedding: np.ndarray
    """Unit-norm float32 vector of the prompt text."""
    token_ids: np.ndarray
    """int32 token ids of the prompt."""
    text_preview: str = ""
    chunk_keys: list[str] = field(default_factory=list)
    """Keys of the stored KV chunks, in token order (empty until stored)."""
    created_at: float = field(default_factory=time.time)
    last_hit_at: float = 0.0
    hit_count: int = 0

    def __post_init__(self) -> None:
        self.embedding = np.ascontiguousarray(self.embedding, dtype=np.float32).reshape(-1)
        self.token_ids = np.ascontiguousarray(self.token_ids, dtype=np.int32).reshape(-1)
        self.text_preview = self.text_preview[:PREVIEW_CHARS]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.size)


@dataclass(frozen=True)
class SearchHit:
    entry: IndexEntry
    distance: float
    """Cosine distance (1 - cosine similarity) to the query; 0 means same direction."""


def _schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("entry_id", pa.string()),
        ("model_id", pa.string()),
        ("scope", pa.string()),
        ("vector", pa.list_(pa.float32(), dim)),
        ("token_ids", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("text_preview", pa.string()),
        ("chunk_keys", pa.list_(pa.string())),
        ("created_at", pa.float64()),
        ("last_hit_at", pa.float64()),
        ("hit_count", pa.int64()),
    ])


class _Partition:
    """Vector index over the entries of one (model, scope); ids are faiss int64 labels."""

    def __init__(self, dim: int, ann_min_rows: int, nprobe: int, seed: int) -> None:
        import faiss

        self._faiss = faiss
        self.dim = dim
        self.ann_min_rows = ann_min_rows
        self.nprobe = nprobe
        self.seed = seed
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.is_ann = False

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, labels)
        if not self.is_ann and len(self) >= self.ann_min_rows:
            self._build_ann()

    def remove(self, labels: np.ndarray) -> None:
        self.index.remove_ids(labels)

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        if k == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        sims, labels = self.index.search(vector[None, :], k)
        keep = labels[0] >= 0
        return sims[0][keep], labels[0][keep]

    def _build_ann(self) -> None:
        """Retrain as IVF-Flat: about 4*sqrt(n) lists, trained on the partition itself."""
        faiss = self._faiss
        n = len(self)
        labels = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        vectors = self.index.index.reconstruct_n(0, n)
        nlist = int(4 * np.sqrt(n))
        started = time.perf_counter()
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist,
                                 faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(self.seed).permutation(n)[: 64 * nlist]]
        ivf.train(sample)
        ivf.nprobe = self.nprobe
        index = faiss.IndexIDMap2(ivf)
        index.add_with_ids(vectors, labels)
        self.index, self.is_ann = index, True
        logger.info("built IVF index (%d lists) over %d entries in %.1f s",
                    nlist, n, time.perf_counter() - started)


class EntryIndex:
    """Durable, searchable set of entries. See the module docstring for invariants."""

    def __init__(
        self,
        path: str | Path,
        dim: int,
        *,
        ann_min_rows: int = 20000,
        flush_rows: int = 64,
        nprobe: int = 48,
        seed: int = 0,
    ) -> None:
        import faiss
        import lancedb

        faiss.omp_set_num_threads(1)  # one query at a time: threads only add overhead
        self.path = Path(path)
        self.dim = dim
        self.ann_min_rows = ann_min_rows
        self.flush_rows = flush_rows
        self.nprobe = nprobe
        self.seed = seed
        """Seeds the IVF training sample, so rebuilt indexes are reproducible."""
        self._lock = threading.RLock()
        self._entries: dict[str, IndexEntry] = {}
        self._label_of: dict[str, int] = {}
        self._id_of_label: dict[int, str] = {}
        self._next_label = 0
        self._partitions: dict[tuple[str, str], _Partition] = {}
        self._persisted: set[str] = set()
        """Ids that have a row in LanceDB: new ids are appended, known ones merged."""
        self._pending_upserts: dict[str, IndexEntry] = {}
        self._pending_deletes: set[str] = set()
        self.path.mkdir(parents=True, exist_ok=True)
        self._db = lancedb.connect(str(self.path))
        self._table = self._open_table()
        self._load()

    # ----------------------------------------------------------------- public API
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._entries

    def add(self, entries: Sequence[IndexEntry]) -> None:
        """Make entries searchable now, durable at the next flush. Re-adding an id replaces it."""
        for entry in entries:
            if entry.embedding.shape != (self.dim,):
                raise ValueError(
                    f"entry {entry.entry_id!r} has an embedding of shape {entry.embedding.shape}; "
                    f"this index holds {self.dim}-dim vectors"
                )
        with self._lock:
            replaced = [e.entry_id for e in entries if e.entry_id in self._entries]
            if replaced:
                self._forget(replaced)
            self._remember(entries)
            for entry in entries:
                self._pending_deletes.discard(entry.entry_id)
                self._pending_upserts[entry.entry_id] = entry
            if len(self._pending_upserts) >= self.flush_rows:
                self.flush()

    def search(
        self, vector: np.ndarray, model_id: str, scopes: Iterable[str], k: int
    ) -> list[SearchHit]:
        """The k nearest entries of ``model_id`` within ``scopes``, nearest first."""
        vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape != (self.dim,):
            raise ValueError(f"query vector has shape {vector.shape}; expected ({self.dim},)")
        with self._lock:
            hits: list[tuple[float, int]] = []
            for scope in dict.fromkeys(scopes):
                partition = self._partitions.get((model_id, scope))
                if partition is not None:
                    sims, labels = partition.search(vector, k)
                    hits.extend(zip(sims.tolist(), labels.tolist()))
            hits.sort(key=lambda hit: -hit[0])
            return [
                SearchHit(self._entries[self._id_of_label[label]], 1.0 - sim)
                for sim, label in hits[:k]
            ]

    def get(self, entry_ids: Iterable[str]) -> list[IndexEntry]:
        """Entries by id, in order; unknown ids are skipped."""
        with self._lock:
            return [self._entries[i] for i in entry_ids if i in self._entries]

    def entries(self) -> list[IndexEntry]:
        with self._lock:
            return list(self._entries.values())

    def record_hits(self, entry_ids: Iterable[str], now: float | None = None) -> None:
        """Count a reuse of each entry (feeds LRU eviction and `kvshare inspect`)."""
        now = time.time() if now is None else now
        with self._lock:
            for entry_id in entry_ids:
                entry = self._entries.get(entry_id)
                if entry is not None:
                    entry.hit_count += 1
                    entry.last_hit_at = now
                    self._pending_upserts[entry_id] = entry

    def delete(self, entry_ids: Iterable[str]) -> int:
        """Remove entries; returns how many existed."""
        with self._lock:
            present = [i for i in dict.fromkeys(entry_ids) if i in self._entries]
            self._forget(present)
            for entry_id in present:
                self._pending_upserts.pop(entry_id, None)
            self._pending_deletes.update(present)
            return len(present)

    def evict_lru(self, max_entries: int) -> list[IndexEntry]:
        """Drop the least recently used entries beyond ``max_entries``; returns them."""
        with self._lock:
            excess = len(self._entries) - max_entries
            if excess <= 0:
                return []
            by_age = sorted(self._entries.values(),
                            key=lambda e: (max(e.last_hit_at, e.created_at), e.entry_id))
            victims = by_age[:excess]
            self.delete([e.entry_id for e in victims])
            return victims

    def flush(self) -> None:
        """Write pending adds, hit counts and deletes to LanceDB (one batch each)."""
        with self._lock:
            if self._pending_deletes:
                self._table.delete(_in_list("entry_id", self._pending_deletes))
                self._persisted.difference_update(self._pending_deletes)
                self._pending_deletes.clear()
            if self._pending_upserts:
                # Appends are cheap; a merge joins against the whole table, so only rows
                # that already exist (hit counts, replacements) go through it.
                known = [e for i, e in self._pending_upserts.items() if i in self._persisted]
                new = [e for i, e in self._pending_upserts.items() if i not in self._persisted]
                if known:
                    (self._table.merge_insert("entry_id")
                     .when_matched_update_all()
                     .when_not_matched_insert_all()
                     .execute(self._to_arrow(known)))
                if new:
                    self._table.add(self._to_arrow(new))
                self._persisted.update(self._pending_upserts)
                self._pending_upserts.clear()

    def compact(self) -> None:
        """Merge LanceDB's small fragments and drop old versions (one per flush)."""
        with self._lock:
            self.flush()
            self._table.optimize()

    def close(self) -> None:
        self.flush()

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "tokens": int(sum(e.num_tokens for e in self._entries.values())),
                "partitions": {
                    f"{model}/{scope or '<public>'}": {"entries": len(p), "ann": p.is_ann}
                    for (model, scope), p in self._partitions.items()
                },
                "pending_writes": len(self._pending_upserts) + len(self._pending_deletes),
                "path": str(self.path),
            }

    def __enter__(self) -> EntryIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _open_table(self):
        if TABLE_NAME in self._db.list_tables().tables:
            table = self._db.open_table(TABLE_NAME)
            stored_dim = table.schema.field("vector").type.list_size
            if stored_dim != self.dim:
                raise ValueError(
                    f"index at {self.path} holds {stored_dim}-dim vectors; "
                    f"this embedder makes {self.dim}-dim ones (use another index directory)"
                )
            return table
        return self._db.create_table(TABLE_NAME, schema=_schema(self.dim))

    def _load(self) -> None:
        table = self._table.to_arrow()
        columns = table.to_pydict()
        if not table.num_rows:
            return
        vectors = table.column("vector").combine_chunks().flatten().to_numpy()
        vectors = vectors.reshape(table.num_rows, self.dim)
        entries = [
            IndexEntry(
                entry_id=columns["entry_id"][i],
                model_id=columns["model_id"][i],
                scope=columns["scope"][i],
                embedding=vectors[i],
                token_ids=np.asarray(columns["token_ids"][i], np.int32),
                text_preview=columns["text_preview"][i],
                chunk_keys=list(columns["chunk_keys"][i]),
                created_at=columns["created_at"][i],
                last_hit_at=columns["last_hit_at"][i],
                hit_count=columns["hit_count"][i],
            )
            for i in range(table.num_rows)
        ]
        self._remember(entries)
        self._persisted.update(e.entry_id for e in entries)
        logger.info("loaded %d index entries from %s", len(entries), self.path)

    def _remember(self, entries: Sequence[IndexEntry]) -> None:
        by_partition: dict[tuple[str, str], list[IndexEntry]] = {}
        for entry in entries:
            label = self._next_label
            self._next_label += 1
            self._entries[entry.entry_id] = entry
            self._label_of[entry.entry_id] = label
            self._id_of_label[label] = entry.entry_id
            by_partition.setdefault((entry.model_id, entry.scope), []).append(entry)
        for key, group in by_partition.items():
            partition = self._partitions.get(key)
            if partition is None:
                partition = self._partitions[key] = _Partition(
                    self.dim, self.ann_min_rows, self.nprobe, self.seed
                )
            labels = np.array([self._label_of[e.entry_id] for e in group], np.int64)
            partition.add(labels, np.stack([e.embedding for e in group]))

    def _forget(self, entry_ids: Sequence[str]) -> None:
        by_partition: dict[tuple[str, str], list[int]] = {}
        for entry_id in entry_ids:
            entry = self._entries.pop(entry_id)
            label = self._label_of.pop(entry_id)
            del self._id_of_label[label]
            by_partition.setdefault((entry.model_id, entry.scope), []).append(label)
        for key, labels in by_partition.items():
            self._partitions[key].remove(np.array(labels, np.int64))

    def _to_arrow(self, entries: Iterable[IndexEntry]) -> pa.Table:
        entries = list(entries)
        vectors = np.stack([e.embedding for e in entries]) if entries else np.zeros((0, self.dim))
        return pa.table(
            {
                "entry_id": [e.entry_id for e in entries],
                "model_id": [e.model_id for e in entries],
                "scope": [e.scope for e in entries],
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.astype(np.float32).ravel()), self.dim
                ),
                "token_ids": pa.array([e.token_ids for e in entries], pa.list_(pa.int32())),
                "num_tokens": pa.array([e.num_tokens for e in entries], pa.int32()),
                "text_preview": [e.text_preview for e in entries],
                "chunk_keys": pa.array([e.chunk_keys for e in entries], pa.list_(pa.string())),
                "created_at": pa.array([e.created_at for e in entries], pa.float64()),
                "last_hit_at": pa.array([e.last_hit_at for e in entries], pa.float64()),
                "hit_count": pa.array([e.hit_count for e in entries], pa.int64()),
            },
            schema=_schema(self.dim),
        )


def _in_list(column: str, values: Iterable[str]) -> str:
    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})"
