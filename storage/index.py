"""The entry index: which earlier prompts exist, in which scope, and where their KV lives.

LanceDB holds the durable table (one row per entry: id, model, scope, embedding, token
ids, preview, times, hit count, chunk keys, approximation depth). The lookup hot path
never queries it: a LanceDB filtered vector query costs 7-20 ms on two cores even with an
IVF-PQ index, while kvshare's whole lookup budget is 5 ms at p50. So the index keeps a
RAM mirror, loaded at open and updated on every write, with one vector partition per
(model, scope) (``kvshare.storage.vector_partition``: exact while small, IVF once a
partition passes ``ann_min_rows``). Token ids live in that mirror too; they cost 4 bytes
a token, about 0.02% of the KV they index (SmolLM2: 23 KiB a token).

Writes and threads
------------------
``add``, ``record_hits`` and ``delete`` change the mirror at once and queue the change
(``pending_writes``); ``flush`` writes the queue to LanceDB, purges removed vectors from
faiss and trains IVF where a partition needs it. With ``auto_flush=True`` (tools,
benchmarks, tests) the writing call itself flushes once ``flush_rows`` changes are
queued or training is due. With ``auto_flush=False`` (the vLLM connector, whose writes
run in EngineCore's loop) those calls only touch memory, never LanceDB, and never train;
the owner calls ``flush`` (and now and then ``compact``) from a background thread,
polling ``needs_flush``.

Two locks. The mirror lock guards the mirror and the queue and is held only for memory
work: never during LanceDB I/O or k-means. The write lock serializes ``flush``,
``compact``, ``close`` and IVF training. Lock order: write lock, then mirror lock. A flush
takes the whole queue under the mirror lock, then writes it without that lock (deletes
first, then upserts); a change made meanwhile joins the next queue, and queues are
written in order, so the last call on an id wins: a delete of an entry whose add is
being written is written after that add. A failed LanceDB write puts the changes no
later call has superseded back into the queue.

Opening
-------
The table is read with Arrow straight into the mirror (entries hold views of its
buffers), and IVF partitions are rebuilt from the IVF cache that ``close``, ``compact``
and training write beside the table, without training or assigning lists again: about
3 s for 100k entries on two busy cores, where retraining took about 24 s. A table of the
first schema (no ``depth``, ``exact_tokens``) gets those columns with their defaults.

Who removes entries, and when
-----------------------------
- ``add`` (and opening, when the caps are lower than the table), when the index goes over
  ``max_entries`` or ``max_tokens``: it evicts the least recently used entries (smallest
  max(last_hit_at, created_at); the new ones included) until within both caps, before
  it returns, and returns them;
- ``delete``: the owner, for entries whose chunks were found missing;
- ``reconcile``: the owner's background sweep, for entries its ``has_chunks`` check
  says have lost chunks;
- ``add`` of an id already present replaces that entry.
Nothing else removes an entry; its LanceDB row goes at the next flush.

Invariants:
- one writer process per directory (LanceDB appends and deletes from several processes
  conflict); within the process every method is thread-safe;
- whenever ``add`` has returned, the index holds at most ``max_entries`` entries and
  ``max_tokens`` prompt tokens;
- an entry is searchable as soon as ``add`` returns and durable once a later flush has
  completed: a crash loses at most the queue, which costs a cache miss or brings back an
  entry whose chunks are gone (loads verify chunks and recompute), never a wrong answer;
- entries are not mutated after ``add`` except through ``record_hits``;
- search never returns an entry of another model or of a scope not asked for (``None``
  asks for every scope).
"""

from __future__ import annotations

import copy
import heapq
import logging
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from kvshare.storage.vector_partition import (
    VectorPartition,
    build_ivf,
    load_ivf_cache,
    save_ivf_cache,
    train_centroids,
)

logger = logging.getLogger(__name__)

TABLE_NAME = "entries"
PREVIEW_CHARS = 200
RECONCILE_BATCH = 256
"""Entries per ``has_chunks`` call in ``reconcile``."""
LANCE_CACHE_BYTES = 16 << 20
"""Cap of each of LanceDB's caches (metadata, index) for an open index. LanceDB caches
the manifest and fragment metadata of every table version it writes, and each flush
writes one to three versions; its defaults (1 GiB metadata, 6 GiB index) let a
long-running writer grow by the metadata of every version ever written (measured: 3.8 MB
after 160 small writes, not released by ``compact``). The index reads LanceDB only at open
and has no LanceDB vector index, so a small cache costs nothing it uses."""

# compact() deletes all old versions on purpose (its docstring says why it is safe here);
# lancedb warns about that on every call.
warnings.filterwarnings("ignore", message=r"optimize\(cleanup_older_than=0\)",
                        category=UserWarning, module=__name__)


def new_entry_id() -> str:
    return uuid.uuid4().hex


class IndexDamagedError(RuntimeError):
    """LanceDB cannot read the index directory (a truncated or missing data file, a
    garbled manifest). Raised instead of LanceDB's own error so that the index's owner can
    set the directory aside and start empty (``kvshare.catalog``): damaged index files
    cost cache misses, never a server that does not start."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        super().__init__(f"index at {path} is damaged: {cause}")
        self.path = path


_LANCE_READ_ERRORS = (RuntimeError, OSError)
"""What LanceDB raises on files it cannot read (its Rust errors arrive as RuntimeError)."""


@dataclass
class IndexEntry:
    """One stored prompt. Its arrays are never written in place: entries loaded from disk
    hold read-only views of the table's Arrow buffers."""

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
    depth: int = 0
    """Approximation depth of the entry's KV: 0 when the model computed all of it exactly;
    d >= 1 when it was built from reused KV whose deepest source had depth d - 1."""
    exact_tokens: int | None = None
    """Leading tokens whose KV is exact; None means all of them."""

    def __post_init__(self) -> None:
        for name in ("entry_id", "model_id", "scope"):
            try:
                getattr(self, name).encode()
            except UnicodeEncodeError:  # one such row would fail every later flush
                raise ValueError(f"IndexEntry.{name}={getattr(self, name)!r} is not UTF-8 "
                                 "text; the index cannot store it") from None
        self.embedding = np.ascontiguousarray(self.embedding, dtype=np.float32).reshape(-1)
        self.token_ids = np.ascontiguousarray(self.token_ids, dtype=np.int32).reshape(-1)
        self.text_preview = self.text_preview[:PREVIEW_CHARS]
        if self.depth < 0:
            raise ValueError(f"entry {self.entry_id!r} has depth {self.depth}; depth is >= 0 "
                             "(0: KV computed exactly by the model)")
        if self.exact_tokens is not None and not 0 <= self.exact_tokens <= self.num_tokens:
            raise ValueError(
                f"entry {self.entry_id!r} has exact_tokens={self.exact_tokens}; expected None "
                f"(all exact) or 0..{self.num_tokens} (its token count)")

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.size)

    @property
    def exact_prefix(self) -> int:
        """Leading tokens whose KV is exact (``exact_tokens``, or all of them)."""
        return self.num_tokens if self.exact_tokens is None else self.exact_tokens

    @property
    def last_used_at(self) -> float:
        """When the entry was last added or reused: what LRU eviction orders by."""
        return max(self.last_hit_at, self.created_at)


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
        pa.field("depth", pa.int32(), nullable=False),
        ("exact_tokens", pa.int32()),
    ])


ADDED_COLUMNS = {"depth": "CAST(0 AS INT)", "exact_tokens": "CAST(NULL AS INT)"}
"""Columns newer than the first schema, with the SQL that fills them in older tables."""


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
        auto_flush: bool = True,
        max_entries: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        import faiss
        import lancedb

        for name, value in (("ann_min_rows", ann_min_rows), ("flush_rows", flush_rows),
                            ("nprobe", nprobe)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, cap in (("max_entries", max_entries), ("max_tokens", max_tokens)):
            if cap is not None and cap < 1:
                raise ValueError(f"{name} must be None (no cap) or >= 1, got {cap}")
        faiss.omp_set_num_threads(1)  # one query at a time: threads only add overhead
        self.path = Path(path)
        self.dim = dim
        self.ann_min_rows = ann_min_rows
        self.flush_rows = flush_rows
        self.nprobe = nprobe
        self.seed = seed
        """Seeds the IVF training sample, so rebuilt indexes are reproducible."""
        self.auto_flush = auto_flush
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        """Cap on the prompt tokens of all entries together: a proxy for the KV they keep."""
        self._write_lock = threading.Lock()
        """Serializes flush, compact, close and IVF training; taken before ``_lock``."""
        self._lock = threading.RLock()
        """The mirror lock, over every attribute below; never held during LanceDB I/O."""
        self._entries: dict[str, IndexEntry] = {}
        self._label_of: dict[str, int] = {}
        self._id_of_label: dict[int, str] = {}
        self._next_label = 0
        self._partitions: dict[tuple[str, str], VectorPartition] = {}
        """(model, scope) -> its vectors; only non-empty partitions: a scope whose last
        entry goes loses its partition, so short-lived tenants leave nothing behind."""
        self._total_tokens = 0
        self._lru: list[tuple[float, str]] = []
        """Heap of (last_used_at, entry id). Every entry has an item with its current
        last_used_at; items of removed entries, or from before a hit, are stale."""
        self._evicted = 0
        self._persisted: set[str] = set()
        """Ids that may have a row in LanceDB: those go through merge, others are appended."""
        self._pending_upserts: dict[str, IndexEntry] = {}
        self._pending_deletes: set[str] = set()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._session = lancedb.Session(index_cache_size_bytes=LANCE_CACHE_BYTES,
                                            metadata_cache_size_bytes=LANCE_CACHE_BYTES)
            self._db = lancedb.connect(str(self.path), session=self._session)
            self._table = self._open_table()
            self._load()
        except _LANCE_READ_ERRORS as exc:
            raise IndexDamagedError(self.path, exc) from exc

    # ----------------------------------------------------------------- public API
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._entries

    @property
    def pending_writes(self) -> int:
        """Queued changes (entry upserts plus deletes) not yet written to LanceDB."""
        with self._lock:
            return len(self._pending_upserts) + len(self._pending_deletes)

    @property
    def needs_flush(self) -> bool:
        """Whether ``flush`` has work: queued changes, or a partition due for IVF training."""
        with self._lock:
            return bool(self._pending_upserts or self._pending_deletes) or self._training_due()

    def add(self, entries: Sequence[IndexEntry]) -> list[IndexEntry]:
        """Make entries searchable now and durable at the next flush; returns those evicted.

        Re-adding an id replaces that entry. If the index goes over ``max_entries`` or
        ``max_tokens``, least recently used entries (possibly new ones) are evicted before
        this returns.
        """
        seen: set[str] = set()
        for entry in entries:
            if entry.embedding.shape != (self.dim,):
                raise ValueError(
                    f"entry {entry.entry_id!r} has an embedding of shape {entry.embedding.shape}; "
                    f"this index holds {self.dim}-dim vectors"
                )
            if entry.entry_id in seen:
                raise ValueError(f"entry id {entry.entry_id!r} appears twice in one add")
            seen.add(entry.entry_id)
        with self._lock:
            self._forget([e.entry_id for e in entries if e.entry_id in self._entries])
            self._remember(entries)
            for entry in entries:
                self._pending_deletes.discard(entry.entry_id)
                self._pending_upserts[entry.entry_id] = entry
            evicted = self._evict_over_capacity()
        self._flush_if_due()
        return evicted

    def search(
        self, vector: np.ndarray, model_id: str, scopes: Iterable[str] | None, k: int
    ) -> list[SearchHit]:
        """The k nearest entries of ``model_id`` within ``scopes`` (None: every scope),
        nearest first."""
        vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape != (self.dim,):
            raise ValueError(f"query vector has shape {vector.shape}; expected ({self.dim},)")
        with self._lock:
            hits: list[tuple[float, int]] = []
            if scopes is None:
                partitions = [p for (model, _), p in self._partitions.items()
                              if model == model_id]
            else:
                partitions = [self._partitions[(model_id, scope)]
                              for scope in dict.fromkeys(scopes)
                              if (model_id, scope) in self._partitions]
            for partition in partitions:
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
        """Count a reuse of each entry (feeds LRU eviction and `kvshare inspect`).

        ``now`` (seconds since the epoch; default: the current time) only moves
        ``last_hit_at`` forward. Unknown ids are skipped.
        """
        now = time.time() if now is None else now
        with self._lock:
            for entry_id in entry_ids:
                entry = self._entries.get(entry_id)
                if entry is not None:
                    entry.hit_count += 1
                    entry.last_hit_at = max(entry.last_hit_at, now)
                    heapq.heappush(self._lru, (entry.last_used_at, entry_id))
                    self._pending_upserts[entry_id] = entry
            self._shrink_lru_heap()
        self._flush_if_due()

    def delete(self, entry_ids: Iterable[str]) -> int:
        """Remove entries; returns how many existed."""
        with self._lock:
            present = [i for i in dict.fromkeys(entry_ids) if i in self._entries]
            self._delete_locked(present)
        self._flush_if_due()
        return len(present)

    def reconcile(self, has_chunks: Callable[[list[IndexEntry]], list[bool]],
                  batch_size: int = RECONCILE_BATCH) -> int:
        """Delete the entries ``has_chunks`` says have lost chunks; returns how many.

        ``has_chunks`` gets batches of ``batch_size`` entries and answers, per entry,
        whether all its chunks are still stored; it runs without any lock held, so it
        may be slow (disk, Redis) while searches and writes go on. An entry replaced or
        removed while its batch was being checked is left alone.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        with self._lock:
            snapshot = list(self._entries.values())
        removed = 0
        for start in range(0, len(snapshot), batch_size):
            batch = snapshot[start:start + batch_size]
            present = list(has_chunks(batch))
            if len(present) != len(batch):
                raise ValueError(f"has_chunks answered {len(present)} values for a batch of "
                                 f"{len(batch)} entries; it must answer one per entry")
            gone = [entry for entry, ok in zip(batch, present) if not ok]
            if gone:
                with self._lock:
                    unchanged = [e.entry_id for e in gone if self._entries.get(e.entry_id) is e]
                    self._delete_locked(unchanged)
                removed += len(unchanged)
        if removed:
            logger.info("reconcile removed %d of %d index entries (chunks gone)",
                        removed, len(snapshot))
        self._flush_if_due()
        return removed

    def flush(self) -> int:
        """Write queued changes to LanceDB, purge removed vectors from the partitions and
        train IVF where due; returns the changes written.

        Safe from any thread while searches and writes go on: the mirror lock is held
        only to take the queue. Flushes run one at a time. If a LanceDB write fails, the
        changes no later call has superseded go back into the queue and the error
        propagates.
        """
        with self._write_lock:
            written = self._write_queue_locked()
            with self._lock:
                for partition in self._partitions.values():
                    partition.purge()
            self._train_due_locked()
        return written

    def compact(self) -> None:
        """Flush, merge LanceDB's fragments and delete every older version; save the IVF cache.

        Each flush leaves a LanceDB version and a small fragment; this folds them into
        one version. Safe from a background thread while searches and writes go on.
        Deleting all old versions at once is safe for this process (it reads LanceDB
        only at open); a reader in another process (``kvshare inspect``) opening the table
        at that moment may fail, and can retry.
        """
        with self._write_lock:
            self._write_queue_locked()
            self._table.optimize(cleanup_older_than=timedelta(0))
            self._save_ivf_cache_locked()

    def close(self) -> None:
        """Flush and save the IVF cache, so the next open neither trains nor assigns lists."""
        with self._write_lock:
            self._write_queue_locked()
            self._save_ivf_cache_locked()

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "tokens": self._total_tokens,
                "max_entries": self.max_entries,
                "max_tokens": self.max_tokens,
                "evicted_since_open": self._evicted,
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

    # ---------------------------------------------------------------- open, load
    def _open_table(self):
        if TABLE_NAME not in self._db.list_tables().tables:
            return self._db.create_table(TABLE_NAME, schema=_schema(self.dim))
        table = self._db.open_table(TABLE_NAME)
        stored_dim = table.schema.field("vector").type.list_size
        if stored_dim != self.dim:
            raise ValueError(
                f"index at {self.path} holds {stored_dim}-dim vectors; "
                f"this embedder makes {self.dim}-dim ones (use another index directory)"
            )
        missing = {name: sql for name, sql in ADDED_COLUMNS.items()
                   if name not in table.schema.names}
        if missing:
            table.add_columns(missing)
            logger.info("index at %s: added columns %s", self.path, ", ".join(missing))
        return table

    def _load(self) -> None:
        started = time.perf_counter()
        entries, embeddings = _entries_from_arrow(self._table.to_arrow(), self.dim)
        keys = {(e.model_id, e.scope) for e in entries}
        saved = load_ivf_cache(self.path, self.dim, self._table.version) if entries else {}
        saved = {key: cached for key, cached in saved.items() if key in keys}
        for key in saved:
            partition = self._partitions[key] = VectorPartition(self.dim)
            partition.use_ivf(build_ivf(saved[key].centroids, saved[key].trained_rows,
                                        self.nprobe), built_from=set())
        with self._lock:
            self._remember(entries, embeddings,
                           {key: cached.list_of for key, cached in saved.items()})
            self._persisted.update(self._entries)
            evicted = self._evict_over_capacity()
        logger.info("loaded %d index entries from %s in %.1f s (IVF cache: %s)", len(entries),
                    self.path, time.perf_counter() - started,
                    ", ".join(f"{m}/{s or '<public>'}" for m, s in saved) or "none")
        if evicted:
            logger.info("evicted %d entries over capacity at open", len(evicted))
        self._flush_if_due()

    # ------------------------------------------------- mirror (mirror lock held)
    def _remember(self, entries: Sequence[IndexEntry], embeddings: np.ndarray | None = None,
                  cached_lists: dict[tuple[str, str], dict[str, int]] | None = None) -> None:
        """Add entries to the mirror. ``embeddings`` (``[n, dim]``, optional) are theirs
        stacked; ``cached_lists`` maps partition -> entry id -> IVF list from the cache."""
        by_partition: dict[tuple[str, str], list[int]] = {}
        for position, entry in enumerate(entries):
            label = self._next_label
            self._next_label += 1
            self._entries[entry.entry_id] = entry
            self._label_of[entry.entry_id] = label
            self._id_of_label[label] = entry.entry_id
            self._total_tokens += entry.num_tokens
            heapq.heappush(self._lru, (entry.last_used_at, entry.entry_id))
            by_partition.setdefault((entry.model_id, entry.scope), []).append(position)
        for key, positions in by_partition.items():
            partition = self._partitions.get(key)
            if partition is None:
                partition = self._partitions[key] = VectorPartition(self.dim)
            group = [entries[p] for p in positions]
            if embeddings is None:
                vectors = np.stack([e.embedding for e in group])
            elif len(positions) == len(entries):
                vectors = embeddings
            else:
                vectors = embeddings[positions]
            labels = np.array([self._label_of[e.entry_id] for e in group], np.int64)
            list_of = (cached_lists or {}).get(key)
            lists = (np.array([list_of.get(e.entry_id, -1) for e in group], np.int64)
                     if list_of else None)
            partition.add(labels, vectors, [e.embedding for e in group], lists)

    def _forget(self, entry_ids: Sequence[str]) -> None:
        by_partition: dict[tuple[str, str], list[int]] = {}
        for entry_id in entry_ids:
            entry = self._entries.pop(entry_id)
            label = self._label_of.pop(entry_id)
            del self._id_of_label[label]
            self._total_tokens -= entry.num_tokens
            by_partition.setdefault((entry.model_id, entry.scope), []).append(label)
        for key, labels in by_partition.items():
            partition = self._partitions[key]
            partition.remove(np.array(labels, np.int64))
            if not partition:
                # A training of it in flight swaps its IVF into this orphan: harmless.
                del self._partitions[key]

    def _delete_locked(self, entry_ids: Sequence[str]) -> None:
        """Forget present entries and queue their deletes.

        The delete is queued even for an id never flushed: its append may be in flight.
        """
        self._forget(entry_ids)
        for entry_id in entry_ids:
            self._pending_upserts.pop(entry_id, None)
        self._pending_deletes.update(entry_ids)

    def _evict_over_capacity(self) -> list[IndexEntry]:
        """Delete least recently used entries until within both caps; returns them."""
        entries_over = len(self._entries) - self.max_entries if self.max_entries else 0
        tokens_over = self._total_tokens - self.max_tokens if self.max_tokens else 0
        victims: dict[str, IndexEntry] = {}
        while entries_over > 0 or tokens_over > 0:
            last_used_at, entry_id = heapq.heappop(self._lru)
            entry = self._entries.get(entry_id)
            if entry is None or entry.last_used_at != last_used_at or entry_id in victims:
                continue  # stale: removed, reused since, or already chosen
            victims[entry_id] = entry
            entries_over -= 1
            tokens_over -= entry.num_tokens
        if victims:
            self._delete_locked(list(victims))
            self._evicted += len(victims)
        return list(victims.values())

    def _shrink_lru_heap(self) -> None:
        """Rebuild the LRU heap once stale items outnumber live ones (hits add items)."""
        if len(self._lru) > 2 * len(self._entries) + 1024:
            self._lru = [(e.last_used_at, i) for i, e in self._entries.items()]
            heapq.heapify(self._lru)

    def _training_due(self) -> bool:
        return any(p.needs_training(self.ann_min_rows) for p in self._partitions.values())

    # ------------------------------------------------ LanceDB (write lock held)
    def _flush_if_due(self) -> None:
        if not self.auto_flush:
            return
        with self._lock:
            due = (len(self._pending_upserts) + len(self._pending_deletes) >= self.flush_rows
                   or self._training_due())
        if due:
            self.flush()

    def _write_queue_locked(self) -> int:
        with self._lock:
            upserts, self._pending_upserts = self._pending_upserts, {}
            deletes, self._pending_deletes = self._pending_deletes, set()
            # Copies, so hits recorded during the write do not change rows mid-conversion.
            known = [copy.copy(e) for i, e in upserts.items() if i in self._persisted]
            new = [copy.copy(e) for i, e in upserts.items() if i not in self._persisted]
        try:
            if deletes:
                self._table.delete(_in_list("entry_id", deletes))
                with self._lock:
                    self._persisted.difference_update(deletes)
            if known:
                # A merge joins against the whole table, so only rows that may exist
                # (hit counts, replacements) go through it; new rows are appended.
                (self._table.merge_insert("entry_id")
                 .when_matched_update_all()
                 .when_not_matched_insert_all()
                 .execute(self._to_arrow(known)))
            if new:
                self._table.add(self._to_arrow(new))
                with self._lock:
                    self._persisted.update(e.entry_id for e in new)
        except BaseException:
            self._requeue(upserts, deletes)
            raise
        return len(deletes) + len(upserts)

    def _requeue(self, upserts: dict[str, IndexEntry], deletes: set[str]) -> None:
        """Queue again the changes of a failed write that no later call superseded."""
        with self._lock:
            for entry_id, entry in upserts.items():
                if self._entries.get(entry_id) is entry:
                    self._pending_upserts.setdefault(entry_id, entry)
            for entry_id in deletes:
                if entry_id not in self._entries:
                    self._pending_deletes.add(entry_id)

    def _train_due_locked(self) -> None:
        """Train IVF for due partitions without the mirror lock, then swap it in."""
        with self._lock:
            due = [(key, partition, partition.snapshot())
                   for key, partition in self._partitions.items()
                   if partition.needs_training(self.ann_min_rows)]
        for (model_id, scope), partition, snapshot in due:
            started = time.perf_counter()
            labels = np.fromiter((label for label, _ in snapshot), np.int64, len(snapshot))
            vectors = np.stack([vector for _, vector in snapshot])
            ivf = build_ivf(train_centroids(vectors, self.seed), len(snapshot), self.nprobe)
            ivf.add(labels, vectors)
            with self._lock:
                partition.use_ivf(ivf, built_from=set(labels.tolist()))
            logger.info("trained IVF (%d lists) for %s/%s over %d entries in %.1f s",
                        ivf.index.nlist, model_id, scope or "<public>", len(snapshot),
                        time.perf_counter() - started)
        if due:
            self._save_ivf_cache_locked()

    def _save_ivf_cache_locked(self) -> None:
        # With nothing queued (and no flush in flight: the write lock is held) the mirror
        # equals the table at this version, so the cached lists are exact for it.
        version = self._table.version
        with self._lock:
            if self._pending_upserts or self._pending_deletes:
                version = None
            assignments = {key: (partition.ivf, *partition.ivf_assignments())
                           for key, partition in self._partitions.items()
                           if partition.ivf is not None}
            id_of_label = dict(self._id_of_label)  # ids are looked up after the lock is left
        if assignments:
            save_ivf_cache(self.path, version, {
                key: (ivf, [id_of_label[label] for label in labels.tolist()], lists)
                for key, (ivf, labels, lists) in assignments.items()})

    def _to_arrow(self, entries: Sequence[IndexEntry]) -> pa.Table:
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
                "depth": pa.array([e.depth for e in entries], pa.int32()),
                "exact_tokens": pa.array([e.exact_tokens for e in entries], pa.int32()),
            },
            schema=_schema(self.dim),
        )


def stored_chunk_keys(path: str | Path) -> dict[str, list[str]]:
    """Entry id -> hex chunk keys of every durable entry of the index at ``path``.

    Reads two columns of the LanceDB table without building the mirror and never writes,
    so a process that holds chunks but not the index (the connector's worker) can check
    them beside the index's writer. An index that was never written reads as empty; one
    LanceDB cannot read raises :class:`IndexDamagedError`.
    """
    import lancedb

    if not Path(path).is_dir():
        return {}
    try:
        db = lancedb.connect(str(path))
        if TABLE_NAME not in db.list_tables().tables:
            return {}
        table = db.open_table(TABLE_NAME).to_arrow().select(["entry_id", "chunk_keys"])
    except _LANCE_READ_ERRORS as exc:
        raise IndexDamagedError(Path(path), exc) from exc
    return dict(zip(table.column("entry_id").to_pylist(), table.column("chunk_keys").to_pylist()))


def _entries_from_arrow(table: pa.Table, dim: int) -> tuple[list[IndexEntry], np.ndarray]:
    """Rows as entries, and their embeddings stacked (``[rows, dim]`` float32).

    Each entry's embedding is a row of that array and its token ids a slice of the
    table's Arrow buffer: no copy per row, and no Python int per token.
    """
    vectors = [chunk.flatten().to_numpy() for chunk in table.column("vector").chunks]
    embeddings = (vectors[0] if len(vectors) == 1 else
                  np.concatenate(vectors) if vectors else np.zeros(0, np.float32))
    embeddings = embeddings.reshape(-1, dim)
    token_ids: list[np.ndarray] = []
    for chunk in table.column("token_ids").chunks:
        values = chunk.values.to_numpy()
        offsets = chunk.offsets.to_numpy().tolist()
        token_ids.extend(values[start:end] for start, end in zip(offsets[:-1], offsets[1:]))
    columns = [table.column(name).to_pylist() for name in (
        "entry_id", "model_id", "scope", "text_preview", "chunk_keys", "created_at",
        "last_hit_at", "hit_count", "depth", "exact_tokens")]
    entries = [
        IndexEntry(entry_id, model_id, scope, embedding, tokens, preview, keys, created_at,
                   last_hit_at, hit_count, depth, exact_tokens)
        for (entry_id, model_id, scope, preview, keys, created_at, last_hit_at, hit_count,
             depth, exact_tokens), embedding, tokens
        in zip(zip(*columns), embeddings, token_ids)
    ]
    return entries, embeddings


def _in_list(column: str, values: Iterable[str]) -> str:
    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})"
