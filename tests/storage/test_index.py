"""EntryIndex on a real LanceDB directory: round trip, restart, scopes, deletes, ANN,
schema migration and the IVF cache. Threads, capacity, compaction and reconcile are in
test_index_lifecycle.py."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from kvshare.storage import index as index_module
from kvshare.storage import vector_partition
from kvshare.storage.index import EntryIndex, IndexEntry

DIM = 16


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def entry(rng, i: int, scope: str = "", model: str = "m") -> IndexEntry:
    return IndexEntry(
        entry_id=f"e{i}", model_id=model, scope=scope, embedding=unit(rng),
        token_ids=np.arange(i, i + 5 + i % 7), text_preview=f"prompt {i}",
        chunk_keys=[f"k{i}a", f"k{i}b"],
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_round_trip_survives_restart(tmp_path, rng):
    entries = [entry(rng, i, scope="t" if i % 2 else "") for i in range(10)]
    with EntryIndex(tmp_path, DIM, flush_rows=4) as index:
        index.add(entries)
        index.record_hits(["e3", "e3"], now=123.0)
    reopened = EntryIndex(tmp_path, DIM)
    assert len(reopened) == 10
    for original in entries:
        (loaded,) = reopened.get([original.entry_id])
        assert loaded.scope == original.scope
        assert loaded.token_ids.tolist() == original.token_ids.tolist()
        assert loaded.chunk_keys == original.chunk_keys
        np.testing.assert_array_equal(loaded.embedding, original.embedding)
    (hit,) = reopened.get(["e3"])
    assert (hit.hit_count, hit.last_hit_at) == (2, 123.0)
    # The reloaded index answers searches like the original did.
    assert reopened.search(entries[3].embedding, "m", ["t"], 1)[0].entry.entry_id == "e3"


def test_search_returns_nearest_first_with_cosine_distance(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM)
    entries = [entry(rng, i) for i in range(20)]
    index.add(entries)
    query = entries[7].embedding
    hits = index.search(query, "m", [""], 5)
    sims = np.array([e.embedding @ query for e in entries])
    assert [h.entry.entry_id for h in hits] == [f"e{i}" for i in np.argsort(-sims)[:5]]
    assert hits[0].distance == pytest.approx(0.0, abs=1e-6)
    assert all(a.distance <= b.distance for a, b in zip(hits, hits[1:]))


def test_search_never_crosses_model_or_scope(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM)
    shared = unit(rng)
    index.add([
        IndexEntry("mine", "m", "tenant-a", shared, [1, 2, 3]),
        IndexEntry("theirs", "m", "tenant-b", shared, [1, 2, 3]),
        IndexEntry("public", "m", "", shared, [1, 2, 3]),
        IndexEntry("other-model", "m2", "tenant-a", shared, [1, 2, 3]),
    ])
    found = {h.entry.entry_id for h in index.search(shared, "m", ["tenant-a", ""], 10)}
    assert found == {"mine", "public"}
    assert {h.entry.entry_id for h in index.search(shared, "m", ["tenant-a"], 10)} == {"mine"}
    assert index.search(shared, "m3", ["tenant-a", ""], 10) == []


def test_a_scope_whose_entries_are_all_gone_leaves_no_partition(tmp_path, rng):
    # Short-lived tenants (a fresh cache_salt per session) must not grow the index's
    # memory after their entries are evicted or deleted.
    index = EntryIndex(tmp_path, DIM, max_entries=2)
    for i in range(6):
        index.add([entry(rng, i, scope=f"tenant-{i}")])
    assert set(index.stats()["partitions"]) == {"m/tenant-4", "m/tenant-5"}
    assert index.delete(["e5"]) == 1
    assert set(index.stats()["partitions"]) == {"m/tenant-4"}
    again = entry(rng, 5, scope="tenant-5")
    index.add([again])
    assert [h.entry.entry_id for h in index.search(again.embedding, "m", ["tenant-5"], 5)] \
        == ["e5"]
    assert index.search(again.embedding, "m", ["tenant-0"], 5) == []


def test_lancedb_caches_stay_within_their_cap_over_many_flushes(tmp_path, rng, monkeypatch):
    # LanceDB caches every written version's metadata (about 600 kB after 50 one-row
    # writes with its default caps); a long-running daemon must not keep all of them.
    cap = 128 << 10
    monkeypatch.setattr(index_module, "LANCE_CACHE_BYTES", cap)
    index = EntryIndex(tmp_path, DIM, auto_flush=False)
    for i in range(60):
        index.add([entry(rng, i)])
        index.flush()
    assert len(index) == 60
    assert index._session.size_bytes <= cap


def test_delete_and_readd_are_durable(tmp_path, rng):
    entries = [entry(rng, i) for i in range(6)]
    with EntryIndex(tmp_path, DIM) as index:
        index.add(entries)
        index.flush()
        assert index.delete(["e1", "e2", "missing"]) == 2
        replacement = IndexEntry("e4", "m", "", entries[4].embedding, [9, 9, 9])
        index.add([replacement])
        assert all(h.entry.entry_id not in ("e1", "e2")
                   for h in index.search(entries[1].embedding, "m", [""], 10))
    reopened = EntryIndex(tmp_path, DIM)
    assert sorted(e.entry_id for e in reopened.entries()) == ["e0", "e3", "e4", "e5"]
    assert reopened.get(["e4"])[0].token_ids.tolist() == [9, 9, 9]


def test_ann_index_is_built_past_threshold_and_still_finds_neighbours(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM, ann_min_rows=300, flush_rows=1000, nprobe=64)
    centers = np.stack([unit(rng) for _ in range(8)])
    vectors = centers[rng.integers(0, 8, 400)] + 0.05 * rng.standard_normal((400, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index.add([IndexEntry(f"v{i}", "m", "", v, [i]) for i, v in enumerate(vectors)])
    assert index.stats()["partitions"]["m/<public>"]["ann"] is True
    hits = index.search(vectors[123], "m", [""], 3)
    assert hits[0].entry.entry_id == "v123"
    # Entries added after the switch are searchable too.
    index.add([IndexEntry("late", "m", "", centers[0], [1])])
    assert index.search(centers[0], "m", [""], 1)[0].entry.entry_id == "late"


def test_wrong_dimension_is_rejected_with_the_shape(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        index.add([IndexEntry("x", "m", "", np.ones(3), [1])])
    index.close()
    with pytest.raises(ValueError, match="holds 16-dim vectors"):
        EntryIndex(tmp_path, 32)


def test_depth_and_exact_tokens_round_trip_and_are_checked(tmp_path, rng):
    with EntryIndex(tmp_path, DIM) as index:
        index.add([
            IndexEntry("exact", "m", "", unit(rng), [1, 2, 3]),
            IndexEntry("approx", "m", "", unit(rng), [1, 2, 3, 4], depth=2, exact_tokens=3),
        ])
    reopened = EntryIndex(tmp_path, DIM)
    exact, approx = reopened.get(["exact", "approx"])
    assert (exact.depth, exact.exact_tokens) == (0, None)
    assert (approx.depth, approx.exact_tokens) == (2, 3)
    with pytest.raises(ValueError, match="depth -1"):
        IndexEntry("bad", "m", "", unit(rng), [1], depth=-1)
    with pytest.raises(ValueError, match=r"exact_tokens=5; expected None \(all exact\) or 0..4"):
        IndexEntry("bad", "m", "", unit(rng), [1, 2, 3, 4], exact_tokens=5)


OLD_SCHEMA = pa.schema([
    ("entry_id", pa.string()), ("model_id", pa.string()), ("scope", pa.string()),
    ("vector", pa.list_(pa.float32(), DIM)), ("token_ids", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()), ("text_preview", pa.string()),
    ("chunk_keys", pa.list_(pa.string())), ("created_at", pa.float64()),
    ("last_hit_at", pa.float64()), ("hit_count", pa.int64()),
])
"""The table schema before depth and exact_tokens existed."""


def test_table_of_the_previous_schema_is_migrated(tmp_path, rng):
    vectors = np.stack([unit(rng) for _ in range(3)])
    old_rows = pa.table({
        "entry_id": ["o0", "o1", "o2"], "model_id": ["m"] * 3, "scope": ["", "t", ""],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
        "token_ids": [[1, 2], [3, 4, 5], [6]], "num_tokens": [2, 3, 1],
        "text_preview": ["a", "b", "c"], "chunk_keys": [["k0"], ["k1"], ["k2"]],
        "created_at": [1.0, 2.0, 3.0], "last_hit_at": [0.0, 5.0, 0.0], "hit_count": [0, 2, 0],
    }, schema=OLD_SCHEMA)
    lancedb.connect(str(tmp_path)).create_table(index_module.TABLE_NAME, old_rows)

    with EntryIndex(tmp_path, DIM) as index:
        (o1,) = index.get(["o1"])
        assert (o1.depth, o1.exact_tokens, o1.hit_count, o1.token_ids.tolist()) == (
            0, None, 2, [3, 4, 5])
        index.add([IndexEntry("new", "m", "", unit(rng), [7, 8, 9], depth=1, exact_tokens=2)])
        index.record_hits(["o0"], now=50.0)
    reopened = EntryIndex(tmp_path, DIM)
    assert {"depth", "exact_tokens"} <= set(reopened._table.schema.names)
    assert sorted(e.entry_id for e in reopened.entries()) == ["new", "o0", "o1", "o2"]
    assert (reopened.get(["new"])[0].depth, reopened.get(["new"])[0].exact_tokens) == (1, 2)
    assert reopened.get(["o0"])[0].last_hit_at == 50.0
    assert reopened.search(vectors[1], "m", ["t"], 1)[0].entry.entry_id == "o1"


def clustered(rng, n: int) -> np.ndarray:
    centers = np.stack([unit(rng) for _ in range(8)])
    vectors = centers[rng.integers(0, 8, n)] + 0.05 * rng.standard_normal((n, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def refuse_training(*_args, **_kwargs):
    raise AssertionError("IVF was trained although the cache held centroids")


@pytest.mark.parametrize("purge_at", [1, vector_partition.PURGE_AT])
def test_ivf_partition_returns_the_right_entries_after_deletes(tmp_path, rng, monkeypatch,
                                                               purge_at):
    # purge_at=1 removes from faiss at once; the default leaves removed vectors in faiss
    # for search to skip.
    monkeypatch.setattr(vector_partition, "PURGE_AT", purge_at)
    index = EntryIndex(tmp_path, DIM, ann_min_rows=300, nprobe=64)
    vectors = clustered(rng, 400)
    index.add([IndexEntry(f"v{i}", "m", "", v, [i]) for i, v in enumerate(vectors)])
    assert index.stats()["partitions"]["m/<public>"]["ann"] is True
    index.delete([f"v{i}" for i in range(0, 400, 3)])
    for i in range(1, 400, 3):
        assert index.search(vectors[i], "m", [""], 1)[0].entry.entry_id == f"v{i}"


def test_reopen_reuses_the_ivf_cache_instead_of_training(tmp_path, rng, monkeypatch):
    vectors = clustered(rng, 400)
    with EntryIndex(tmp_path, DIM, ann_min_rows=300, nprobe=64) as index:
        index.add([IndexEntry(f"v{i}", "m", "", v, [i]) for i, v in enumerate(vectors)])
    monkeypatch.setattr(index_module, "train_centroids", refuse_training)
    reopened = EntryIndex(tmp_path, DIM, ann_min_rows=300, nprobe=64)
    assert reopened.stats()["partitions"]["m/<public>"]["ann"] is True
    assert all(reopened.search(vectors[i], "m", [""], 1)[0].entry.entry_id == f"v{i}"
               for i in range(0, 400, 7))

    # Another writer changed the table after the cache was saved: the cached lists are
    # not trusted, so the moved vector lands in its new list (nprobe=1 searches only the
    # list nearest the query), but the centroids are still reused.
    moved = -vectors[1]
    lancedb.connect(str(tmp_path)).open_table(index_module.TABLE_NAME).update(
        where="entry_id = 'v1'", values={"vector": moved.tolist()})
    changed = EntryIndex(tmp_path, DIM, ann_min_rows=300, nprobe=1)
    assert changed.stats()["partitions"]["m/<public>"]["ann"] is True
    assert changed.search(moved, "m", [""], 1)[0].entry.entry_id == "v1"


@pytest.mark.parametrize("field", ["entry_id", "model_id", "scope"])
def test_text_the_index_cannot_store_is_refused_by_name(rng, field):
    fields = {"entry_id": "e", "model_id": "m", "scope": "", field: "\ud800bad"}
    with pytest.raises(ValueError, match=f"IndexEntry.{field}="):
        IndexEntry(fields["entry_id"], fields["model_id"], fields["scope"], unit(rng), [1])
