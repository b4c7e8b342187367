"""Vector search over one (model, scope) partition of the entry index, and its start-up cache.

A partition answers "the k entries nearest this query" by inner product over unit vectors.
It is exact (faiss ``IndexFlatIP``) while small and IVF-Flat once it reaches the index's
``ann_min_rows``: about 4*sqrt(n) lists trained by k-means on the partition itself,
searched with ``nprobe`` lists. IVF gives exact inner products for the vectors it scans,
so a badly placed vector costs recall, never a wrong distance.

The two slow steps of IVF are training (k-means; seconds at 100k vectors) and assigning
every vector to its list (about 3 s at 100k vectors, 1264 lists, 256 dims, one core).
The *IVF cache* (``ivf_cache.npz`` beside the LanceDB table) keeps both across restarts:
each partition's centroids, the row count they were trained on, and each entry's list.
Centroids stay valid whatever the table holds now; the list of each entry is trusted only
when the cache was written at the table version being opened (the mirror then equalled
the table row for row), otherwise the vectors are assigned again with the saved centroids.

Labels are the entry index's int64 ids for its entries (faiss ids). Partitions are not
thread-safe: the entry index calls them under its mirror lock; ``train_centroids`` and
``build_ivf`` are pure functions it calls outside that lock.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CACHE_FILE = "ivf_cache.npz"
CACHE_FORMAT = 1
TRAIN_POINTS_PER_LIST = 64
"""k-means sample size per list."""
MIN_POINTS_PER_LIST = 39
"""Fewest training vectors per list for which faiss's k-means is stable (it warns below)."""
TRAIN_ITERATIONS = 10
PURGE_AT = 1024
"""Removed vectors a partition keeps in faiss (skipped at search) before purging them."""
RETRAIN_GROWTH = 4
"""Retrain once a partition holds this many times the rows it was trained on: its ideal
list count (4*sqrt(n)) has then doubled."""


def lists_for(rows: int) -> int:
    """IVF list count for ``rows`` vectors: about 4*sqrt(n), capped so that every list
    has ``MIN_POINTS_PER_LIST`` vectors to train on; at least 1."""
    return max(1, min(int(4 * np.sqrt(rows)), rows // MIN_POINTS_PER_LIST))


def train_centroids(vectors: np.ndarray, seed: int) -> np.ndarray:
    """Spherical k-means centroids (``[lists_for(n), dim]`` float32) of ``vectors``."""
    import faiss

    rows, dim = vectors.shape
    nlist = lists_for(rows)
    sample = vectors[np.random.default_rng(seed).permutation(rows)[:TRAIN_POINTS_PER_LIST * nlist]]
    kmeans = faiss.Kmeans(dim, nlist, niter=TRAIN_ITERATIONS, spherical=True, seed=seed,
                          max_points_per_centroid=TRAIN_POINTS_PER_LIST)
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


@dataclass
class IVF:
    """An IVF-Flat index over fixed centroids; ``quantizer`` is kept alive beside it."""

    index: object
    quantizer: object
    centroids: np.ndarray
    trained_rows: int

    def add(self, labels: np.ndarray, vectors: np.ndarray,
            lists: np.ndarray | None = None) -> None:
        """Add vectors; ``lists`` (one per vector) skips assigning them to the centroids."""
        import faiss

        if not labels.size:
            return
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if lists is None:
            self.index.add_with_ids(vectors, labels)
        else:
            lists = np.ascontiguousarray(lists, dtype=np.int64)
            self.index.add_core(labels.size, faiss.swig_ptr(vectors), faiss.swig_ptr(labels),
                                faiss.swig_ptr(lists))

    def assignments(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, list of each label) of every vector held."""
        import faiss

        invlists = self.index.invlists
        labels, lists = [], []
        for number in range(self.index.nlist):
            size = invlists.list_size(number)
            if size:
                labels.append(faiss.rev_swig_ptr(invlists.get_ids(number), size).copy())
                lists.append(np.full(size, number, np.int64))
        if not labels:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(labels), np.concatenate(lists)


def build_ivf(centroids: np.ndarray, trained_rows: int, nprobe: int) -> IVF:
    """An empty IVF-Flat index (inner product) over ``centroids``."""
    import faiss

    nlist, dim = centroids.shape
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = nprobe
    return IVF(index, quantizer, centroids, trained_rows)


class VectorPartition:
    """The vectors of one (model, scope); exact search until ``use_ivf``.

    Removal is lazy: a faiss removal scans the whole partition (about 1-2 ms at 20k-100k
    vectors), too slow for every eviction on the caller's thread. Removed labels stay in
    faiss, are skipped by ``search``, and are purged in one pass once ``PURGE_AT`` have
    gathered or when the owner calls ``purge`` (the entry index does in ``flush``).
    """

    def __init__(self, dim: int) -> None:
        import faiss

        self.dim = dim
        self.members: dict[int, np.ndarray] = {}
        """label -> vector of every entry held; the source for (re)training."""
        self._flat = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        self.ivf: IVF | None = None
        self._removed: set[int] = set()
        """Labels removed from ``members`` but still in the faiss index."""

    def __len__(self) -> int:
        return len(self.members)

    @property
    def is_ann(self) -> bool:
        return self.ivf is not None

    @property
    def _index(self):
        return self.ivf.index if self.ivf is not None else self._flat

    def needs_training(self, ann_min_rows: int) -> bool:
        """Big enough for IVF and not trained yet, or grown far past its training."""
        if self.ivf is None:
            return len(self) >= ann_min_rows
        return len(self) >= RETRAIN_GROWTH * self.ivf.trained_rows

    def add(self, labels: np.ndarray, vectors: np.ndarray, rows: Sequence[np.ndarray],
            lists: np.ndarray | None = None) -> None:
        """Hold ``vectors`` (``[n, dim]``) under new ``labels``.

        ``rows`` are the same vectors as the arrays to keep for retraining (the entries'
        own, so the partition holds no second copy). ``lists`` gives a cached IVF list
        per vector (-1: unknown) and is used only when the partition serves from IVF.
        """
        self.members.update(zip(labels.tolist(), rows))
        if self.ivf is None:
            self._flat.add_with_ids(vectors, labels)
        elif lists is None:
            self.ivf.add(labels, vectors)
        elif (lists >= 0).all():
            self.ivf.add(labels, vectors, lists)
        else:
            known = lists >= 0
            self.ivf.add(labels[known], vectors[known], lists[known])
            self.ivf.add(labels[~known], vectors[~known])

    def remove(self, labels: np.ndarray) -> None:
        for label in labels.tolist():
            del self.members[label]
            self._removed.add(label)
        if len(self._removed) >= PURGE_AT:
            self.purge()

    def purge(self) -> None:
        """Drop removed vectors from the faiss index (one scan of the partition)."""
        if self._removed:
            self._index.remove_ids(np.fromiter(self._removed, np.int64, len(self._removed)))
            self._removed.clear()

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, labels) of the ``k`` nearest vectors, nearest first."""
        k = min(k, len(self))
        if k == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        sims, labels = self._index.search(vector[None, :], k + len(self._removed))
        sims, labels = sims[0], labels[0]
        keep = labels >= 0
        if self._removed:
            keep &= np.fromiter((label not in self._removed for label in labels.tolist()),
                                bool, labels.size)
        return sims[keep][:k], labels[keep][:k]

    def snapshot(self) -> list[tuple[int, np.ndarray]]:
        """The (label, vector) pairs held now, for training outside the lock."""
        return list(self.members.items())

    def use_ivf(self, ivf: IVF, built_from: set[int]) -> None:
        """Serve searches from ``ivf``, which holds exactly the labels ``built_from``.

        Labels added or removed since that snapshot are applied to ``ivf`` first, so
        building it outside the lock loses no concurrent write.
        """
        import faiss

        added = [label for label in self.members if label not in built_from]
        removed = [label for label in built_from if label not in self.members]
        if added:
            ivf.add(np.array(added, np.int64), np.stack([self.members[a] for a in added]))
        if removed:
            ivf.index.remove_ids(np.array(removed, np.int64))
        self.ivf = ivf
        self._removed.clear()
        self._flat = faiss.IndexIDMap(faiss.IndexFlatIP(self.dim))  # frees the flat copy

    def ivf_assignments(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, IVF list of each) of the vectors held; the partition must be IVF."""
        labels, lists = self.ivf.assignments()
        if self._removed:
            live = np.fromiter((label in self.members for label in labels.tolist()), bool,
                               labels.size)
            labels, lists = labels[live], lists[live]
        return labels, lists


@dataclass
class SavedPartition:
    """What the IVF cache holds for one partition."""

    centroids: np.ndarray
    trained_rows: int
    list_of: dict[str, int]
    """entry id -> IVF list; empty unless the cache matches the table version opened."""


def save_ivf_cache(directory: Path, table_version: int | None,
                   partitions: dict[tuple[str, str], tuple[IVF, list[str], np.ndarray]]) -> None:
    """Write the cache atomically: per partition its IVF, entry ids and their lists.

    ``table_version`` is the LanceDB version the ids and lists describe row for row, or
    None when they describe none (writes were pending): then only centroids get reused.
    """
    header = {"format": CACHE_FORMAT, "table_version": table_version, "partitions": []}
    arrays: dict[str, np.ndarray] = {}
    for number, ((model_id, scope), (ivf, entry_ids, lists)) in enumerate(partitions.items()):
        header["partitions"].append({"model_id": model_id, "scope": scope,
                                     "trained_rows": ivf.trained_rows})
        arrays[f"centroids_{number}"] = ivf.centroids
        arrays[f"entry_ids_{number}"] = np.array(entry_ids, dtype=np.str_)
        arrays[f"lists_{number}"] = lists.astype(np.int32)
    target = directory / CACHE_FILE
    partial = directory / f".{CACHE_FILE}.{os.getpid()}.partial"
    with open(partial, "wb") as out:
        np.savez(out, header=np.array(json.dumps(header)), **arrays)
    os.replace(partial, target)


def load_ivf_cache(directory: Path, dim: int,
                   table_version: int) -> dict[tuple[str, str], SavedPartition]:
    """The cached partitions; empty when there is no usable cache (it is only a cache)."""
    path = directory / CACHE_FILE
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != CACHE_FORMAT:
                return {}
            same_version = header["table_version"] == table_version
            saved = {}
            for number, meta in enumerate(header["partitions"]):
                centroids = data[f"centroids_{number}"]
                if centroids.ndim != 2 or centroids.shape[1] != dim:
                    return {}
                list_of = (dict(zip(data[f"entry_ids_{number}"].tolist(),
                                    data[f"lists_{number}"].tolist()))
                           if same_version else {})
                saved[(meta["model_id"], meta["scope"])] = SavedPartition(
                    centroids.astype(np.float32), int(meta["trained_rows"]), list_of)
            return saved
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
        logger.warning("ignoring unreadable IVF cache %s (%s); the index retrains", path, error)
        return {}
