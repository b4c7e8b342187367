"""EntryIndex lifecycle on a real LanceDB directory: writes kept off the caller's thread,
flushes racing writes, capacity eviction, compaction and reconciliation.

Interleavings are forced with events inside a LanceDB call (a slow disk, injected), never
with sleeps; every wait has a timeout so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvshare.storage import index as index_module
from kvshare.storage.index import EntryIndex, IndexEntry

DIM = 16
WAIT_S = 60


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def entry(rng, name: str, tokens: int = 4, created_at: float = 0.0) -> IndexEntry:
    return IndexEntry(name, "m", "", unit(rng), np.arange(tokens), f"prompt {name}",
                      chunk_keys=[f"{name}-k0"], created_at=created_at)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def stored(path) -> dict[str, IndexEntry]:
    """What a fresh open finds on disk."""
    return {e.entry_id: e for e in EntryIndex(path, DIM).entries()}


class BlockingCall:
    """Wraps a LanceDB table method: the first call waits inside until released."""

    def __init__(self, method) -> None:
        self.method = method
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(WAIT_S), "test never released the blocked LanceDB call"
        return self.method(*args, **kwargs)


def run_in_thread(target) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            target()
        except BaseException as error:  # surfaced by the test's assertions
            errors.append(error)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    return thread, errors


# ------------------------------------------------------------- writes off the caller
class NoLanceDB:
    """Stands in for the LanceDB table: any use is a test failure."""

    def __getattr__(self, name: str):
        raise AssertionError(f"LanceDB table.{name} used from a write with auto_flush=False")


def refuse_training(*_args, **_kwargs):
    raise AssertionError("IVF trained inside a write with auto_flush=False")


def test_writes_without_auto_flush_touch_only_memory(tmp_path, rng, monkeypatch):
    index = EntryIndex(tmp_path, DIM, auto_flush=False, flush_rows=2, ann_min_rows=8)
    table, index._table = index._table, NoLanceDB()
    monkeypatch.setattr(index_module, "train_centroids", refuse_training)
    index.add([entry(rng, f"e{i}") for i in range(10)])  # past flush_rows and ann_min_rows
    index.record_hits(["e1", "e1", "e2"], now=10.0)
    assert index.delete(["e3", "missing"]) == 1
    assert index.pending_writes == 10  # nine upserts (hits merged into them), one delete
    assert index.needs_flush
    assert index.search(index.get(["e1"])[0].embedding, "m", [""], 1)[0].entry.entry_id == "e1"

    index._table = table
    monkeypatch.undo()
    assert index.flush() == 10
    assert (index.pending_writes, index.needs_flush) == (0, False)
    assert index.stats()["partitions"]["m/<public>"]["ann"] is True  # trained in flush
    on_disk = stored(tmp_path)
    assert sorted(on_disk) == sorted(f"e{i}" for i in range(10) if i != 3)
    assert (on_disk["e1"].hit_count, on_disk["e1"].last_hit_at) == (2, 10.0)


def test_writes_during_a_flush_wait_for_the_next_one_and_a_delete_wins(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM, auto_flush=False)
    index.add([entry(rng, "a"), entry(rng, "b")])
    append = index._table.add = BlockingCall(index._table.add)
    flusher, flush_errors = run_in_thread(index.flush)
    try:
        assert append.entered.wait(WAIT_S)  # the flush is inside LanceDB, appending a and b

        def write_meanwhile() -> None:
            assert index.delete(["a"]) == 1  # a's append is in flight: this delete must win
            index.add([entry(rng, "c")])
            index.record_hits(["b"], now=7.0)
            assert [h.entry.entry_id for h in index.search(
                index.get(["c"])[0].embedding, "m", [""], 1)] == ["c"]

        writer, write_errors = run_in_thread(write_meanwhile)
        writer.join(WAIT_S)
        assert not writer.is_alive(), "writes blocked behind the flush's LanceDB I/O"
        assert write_errors == []
        assert index.pending_writes == 3
    finally:
        append.release.set()
        flusher.join(WAIT_S)
    assert flush_errors == []
    assert sorted(stored(tmp_path)) == ["a", "b"]  # the first flush wrote its own snapshot
    index.flush()
    on_disk = stored(tmp_path)
    assert sorted(on_disk) == ["b", "c"]
    assert (on_disk["b"].hit_count, on_disk["b"].last_hit_at) == (1, 7.0)


def test_concurrent_writers_and_a_flusher_end_with_disk_equal_to_memory(tmp_path):
    index = EntryIndex(tmp_path, DIM, auto_flush=False)
    writers_done = threading.Event()

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        names = [f"w{seed}-{i}" for i in range(12)]
        for step in range(300):
            name = names[rng.integers(len(names))]
            action = rng.integers(3)
            if action == 0:
                index.add([entry(rng, name, tokens=1 + step % 5)])  # add or replace
            elif action == 1:
                index.delete([name])
            else:
                index.record_hits([name], now=float(step))

    def flusher() -> None:
        while not writers_done.is_set():
            index.flush()

    flush_thread, flush_errors = run_in_thread(flusher)
    writers = [run_in_thread(lambda seed=seed: writer(seed)) for seed in range(3)]
    for thread, _ in writers:
        thread.join(WAIT_S)
    writers_done.set()
    flush_thread.join(WAIT_S)
    assert flush_errors == [] and all(errors == [] for _, errors in writers)
    index.flush()
    on_disk = stored(tmp_path)
    in_memory = {e.entry_id: e for e in index.entries()}
    assert sorted(on_disk) == sorted(in_memory)
    for name, mem in in_memory.items():
        disk = on_disk[name]
        assert (disk.hit_count, disk.last_hit_at, disk.token_ids.tolist()) == (
            mem.hit_count, mem.last_hit_at, mem.token_ids.tolist())
        np.testing.assert_array_equal(disk.embedding, mem.embedding)


def test_a_failed_flush_queues_its_changes_again(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM, auto_flush=False)
    index.add([entry(rng, "a")])
    index.flush()
    index.add([entry(rng, "b")])
    index.delete(["a"])
    real_add = index._table.add

    def full_disk(*_args, **_kwargs):
        raise OSError("No space left on device")

    index._table.add = full_disk
    with pytest.raises(OSError, match="No space left"):
        index.flush()
    assert index.pending_writes == 2
    index._table.add = real_add
    index.flush()
    assert sorted(stored(tmp_path)) == ["b"]


# ------------------------------------------------------------------ capacity
def test_add_evicts_least_recently_used_beyond_max_entries(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM, max_entries=3)
    assert index.add([entry(rng, f"e{i}", created_at=float(i)) for i in range(3)]) == []
    index.record_hits(["e0"], now=100.0)
    evicted = index.add([entry(rng, "e3", created_at=3.0), entry(rng, "e4", created_at=4.0)])
    assert sorted(e.entry_id for e in evicted) == ["e1", "e2"]
    assert sorted(e.entry_id for e in index.entries()) == ["e0", "e3", "e4"]
    assert index.stats()["evicted_since_open"] == 2
    index.close()
    assert sorted(stored(tmp_path)) == ["e0", "e3", "e4"]


def test_index_never_exceeds_its_caps_and_evicts_in_lru_order(tmp_path):
    rng = np.random.default_rng(1)
    max_entries, max_tokens = 20, 150
    index = EntryIndex(tmp_path, DIM, auto_flush=False, max_entries=max_entries,
                       max_tokens=max_tokens)
    for step in range(400):
        held = index.entries()
        if held and rng.random() < 0.4:
            index.record_hits([held[rng.integers(len(held))].entry_id], now=float(step))
            continue
        new = [entry(rng, f"s{step}-{j}", tokens=int(rng.integers(1, 30)),
                     created_at=float(step)) for j in range(int(rng.integers(1, 4)))]
        # Expected victims: least recently used first (ties by id), until within both caps.
        by_use = sorted(held + new, key=lambda e: (e.last_used_at, e.entry_id))
        expected, count, tokens = set(), len(by_use), sum(e.num_tokens for e in by_use)
        for candidate in by_use:
            if count <= max_entries and tokens <= max_tokens:
                break
            expected.add(candidate.entry_id)
            count, tokens = count - 1, tokens - candidate.num_tokens
        evicted = index.add(new)
        assert {e.entry_id for e in evicted} == expected
        stats = index.stats()
        assert stats["entries"] <= max_entries and stats["tokens"] <= max_tokens
    index.flush()
    assert sorted(stored(tmp_path)) == sorted(e.entry_id for e in index.entries())


def test_reopening_with_a_smaller_cap_evicts_at_open(tmp_path, rng):
    with EntryIndex(tmp_path, DIM) as index:
        index.add([entry(rng, f"e{i}", created_at=float(i)) for i in range(6)])
    smaller = EntryIndex(tmp_path, DIM, max_entries=4)
    assert sorted(e.entry_id for e in smaller.entries()) == ["e2", "e3", "e4", "e5"]


def test_bad_caps_are_rejected_with_the_value(tmp_path):
    with pytest.raises(ValueError, match="max_entries must be None .* got 0"):
        EntryIndex(tmp_path, DIM, max_entries=0)
    with pytest.raises(ValueError, match="max_tokens must be None .* got -5"):
        EntryIndex(tmp_path, DIM, max_tokens=-5)


# ---------------------------------------------------------------- compaction
def test_compact_folds_versions_while_searches_run_and_keeps_every_row(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM, auto_flush=False)
    names = [f"e{i}" for i in range(40)]
    for name in names:
        index.add([entry(rng, name)])
        index.flush()
    index.record_hits(names[:10], now=9.0)
    index.delete(names[-5:])
    index.flush()
    versions_before = len(index._table.list_versions())
    fragments_before = index._table.stats()["fragment_stats"]["num_fragments"]
    assert versions_before > 40 and fragments_before > 10

    probes = {name: index.get([name])[0].embedding for name in names[:-5]}
    compactor, compact_errors = run_in_thread(index.compact)
    searched = 0
    while compactor.is_alive() or searched == 0:  # searches are served during compaction
        name = names[searched % 35]
        assert index.search(probes[name], "m", [""], 1)[0].entry.entry_id == name
        searched += 1
    assert compact_errors == []
    assert len(index._table.list_versions()) == 1
    assert index._table.stats()["fragment_stats"]["num_fragments"] == 1
    on_disk = stored(tmp_path)
    assert sorted(on_disk) == sorted(names[:-5])
    assert all(on_disk[name].hit_count == 1 for name in names[:10])
    for name in names[:-5]:
        np.testing.assert_array_equal(on_disk[name].embedding, probes[name])


# ------------------------------------------------------------- reconciliation
def test_reconcile_deletes_entries_whose_chunks_are_gone(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM, auto_flush=False)
    index.add([entry(rng, f"e{i}") for i in range(10)])
    lost = {"e2-k0", "e5-k0", "e7-k0"}
    batches: list[int] = []

    def has_chunks(batch: list[IndexEntry]) -> list[bool]:  # the tiers lost some chunks
        batches.append(len(batch))
        return [not (set(e.chunk_keys) & lost) for e in batch]

    assert index.reconcile(has_chunks, batch_size=4) == 3
    assert batches == [4, 4, 2]
    assert sorted(e.entry_id for e in index.entries()) == [
        f"e{i}" for i in range(10) if i not in (2, 5, 7)]
    index.flush()
    assert sorted(stored(tmp_path)) == sorted(e.entry_id for e in index.entries())


def test_reconcile_checks_without_the_lock_and_spares_entries_replaced_meanwhile(tmp_path,
                                                                                 rng):
    index = EntryIndex(tmp_path, DIM, auto_flush=False)
    index.add([entry(rng, "old"), entry(rng, "kept")])
    checking, go_on = threading.Event(), threading.Event()

    def has_chunks(batch: list[IndexEntry]) -> list[bool]:
        checking.set()
        assert go_on.wait(WAIT_S)
        return [e.entry_id == "kept" for e in batch]  # says "old" lost its chunks

    reconciler, errors = run_in_thread(lambda: index.reconcile(has_chunks))
    try:
        assert checking.wait(WAIT_S)
        # While the check runs, searches are served and "old" is re-stored with new chunks.
        fresh = entry(rng, "old")
        index.add([fresh])
        assert index.search(fresh.embedding, "m", [""], 1)[0].entry is fresh
    finally:
        go_on.set()
        reconciler.join(WAIT_S)
    assert errors == []
    assert index.get(["old"]) == [fresh]


def test_reconcile_rejects_a_check_with_the_wrong_answer_count(tmp_path, rng):
    index = EntryIndex(tmp_path, DIM)
    index.add([entry(rng, "a"), entry(rng, "b")])
    with pytest.raises(ValueError, match="answered 1 values for a batch of 2"):
        index.reconcile(lambda batch: [True])
