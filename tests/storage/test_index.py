"""EntryIndex on a real LanceDB directory: round trip, restart, scopes, deletes, ANN."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_evict_lru_drops_least_recently_used(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM)
    entries = [entry(rng, i) for i in range(5)]
    for i, e in enumerate(entries):
        e.created_at = float(i)
    index.add(entries)
    index.record_hits(["e0"], now=100.0)
    victims = index.evict_lru(3)
    assert sorted(v.entry_id for v in victims) == ["e1", "e2"]
    assert sorted(e.entry_id for e in index.entries()) == ["e0", "e3", "e4"]


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
