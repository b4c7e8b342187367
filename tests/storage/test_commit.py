"""Entry commit (index only after chunks) and partial entry loads with a token mask."""

from dataclasses import dataclass

import pytest
import torch
from kv_samples import SMALL, random_kv

from kvshare.storage.chunk import split_prompt_kv
from kvshare.storage.commit import commit_entries, entries_missing_chunks, load_entry_kv
from kvshare.storage.disk_tier import DiskTier
from kvshare.storage.index import EntryIndex, IndexEntry, stored_chunk_keys
from kvshare.storage.memory_tier import MemoryTier
from kvshare.storage.redis_tier import RedisTier
from kvshare.storage.tiered_store import TieredStore


@dataclass
class FakeEntry:
    name: str
    token_ids: list[int]
    keys: list[bytes]


class ListIndex:
    """Stand-in for kvshare.storage.index.EntryIndex: records add() calls."""

    def __init__(self) -> None:
        self.calls: list[list[FakeEntry]] = []

    def add(self, entries: list[FakeEntry]) -> None:
        self.calls.append(list(entries))


def prompt(name: str, tokens: list[int], seed: int):
    kv = random_kv(SMALL, len(tokens), seed)
    chunks = split_prompt_kv("m", kv, tokens, 16, scope="")
    return FakeEntry(name, tokens, [c.key for c in chunks]), chunks, kv


def test_entries_are_added_once_after_their_chunks_are_stored(tmp_path, codec):
    store = TieredStore([DiskTier(tmp_path, 1 << 20, codec)])
    index = ListIndex()
    a, b = prompt("a", list(range(40)), 0), prompt("b", list(range(100, 130)), 1)
    assert commit_entries(store, index, [a[:2], b[:2]]) == [True, True]
    assert [[e.name for e in call] for call in index.calls] == [["a", "b"]]
    assert all(store.contains(a[0].keys + b[0].keys))


def test_nothing_is_added_when_the_chunks_could_not_be_stored(codec, redis_server):
    store = TieredStore([RedisTier(redis_server.url, codec)])
    redis_server.kill()
    index = ListIndex()
    assert commit_entries(store, index, [prompt("a", list(range(40)), 0)[:2]]) == [False]
    assert index.calls == []


def test_only_entries_whose_every_chunk_is_held_are_added(tmp_path, codec):
    small = prompt("small", list(range(16)), 0)
    large = prompt("large", list(range(200, 264)), 1)  # 4 chunks
    one_chunk = small[1][0].nbytes
    # A CPU tier with room for 2 chunks evicts the large entry's first chunks while
    # storing its last ones: its put "succeeds" chunk by chunk, yet the entry is not whole.
    store = TieredStore([MemoryTier.cpu(2 * one_chunk)])
    index = ListIndex()
    assert commit_entries(store, index, [large[:2], small[:2]]) == [False, True]
    assert [[e.name for e in call] for call in index.calls] == [["small"]]


def test_entry_without_chunks_is_an_error(tmp_path, codec):
    store = TieredStore([DiskTier(tmp_path, 1 << 20, codec)])
    with pytest.raises(ValueError, match="has no chunks"):
        commit_entries(store, ListIndex(), [(FakeEntry("x", [], []), [])])


def test_load_returns_everything_when_all_chunks_are_held(tmp_path, codec):
    store = TieredStore([DiskTier(tmp_path, 1 << 20, codec)])
    entry, chunks, kv = prompt("a", list(range(40)), 0)
    commit_entries(store, ListIndex(), [(entry, chunks)])
    loaded = load_entry_kv(store, entry.keys, entry.token_ids, 16, SMALL)
    assert loaded.num_available == 40 and bool(loaded.available.all())
    assert torch.equal(loaded.kv, kv)


def test_load_fetches_only_the_chunks_asked_for(tmp_path, codec):
    disk = DiskTier(tmp_path, 1 << 20, codec)
    store = TieredStore([disk])
    entry, chunks, kv = prompt("a", list(range(40)), 0)  # chunks: 0-16, 16-32, 32-40
    commit_entries(store, ListIndex(), [(entry, chunks)])
    reads_before = disk.stats().hits
    loaded = load_entry_kv(store, entry.keys, entry.token_ids, 16, SMALL, chunks=[2, 0])
    assert disk.stats().hits - reads_before == 2
    assert loaded.available.tolist() == [True] * 16 + [False] * 16 + [True] * 8
    assert torch.equal(loaded.kv[:, :, 32:], kv[:, :, 32:])
    assert not loaded.kv[:, :, 16:32].any()
    with pytest.raises(ValueError, match=r"chunk indices \[0, 3\] out of range for 3 chunks"):
        load_entry_kv(store, entry.keys, entry.token_ids, 16, SMALL, chunks=[3, 0])


def test_lost_or_corrupt_chunks_become_tokens_to_recompute(tmp_path, codec, redis_server):
    disk = DiskTier(tmp_path, 1 << 20, codec)
    redis_tier = RedisTier(redis_server.url, codec)
    store = TieredStore([disk, redis_tier])
    entry, chunks, kv = prompt("a", list(range(40)), 0)  # chunks: 0-16, 16-32, 32-40
    commit_entries(store, ListIndex(), [(entry, chunks)])

    disk.delete([entry.keys[0]])  # chunk 0 evicted locally
    path = tmp_path / f"{entry.keys[1].hex()}.kvc"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)  # chunk 1 damaged on disk
    redis_server.kill()  # and Redis lost both copies (crash; a flush looks the same)
    redis_server.start()

    loaded = load_entry_kv(store, entry.keys, entry.token_ids, 16, SMALL)
    expected = torch.zeros(40, dtype=torch.bool)
    expected[32:] = True
    assert torch.equal(loaded.available, expected)
    assert torch.equal(loaded.kv[:, :, 32:], kv[:, :, 32:])
    assert not loaded.kv[:, :, :32].any()


def test_chunk_with_other_tokens_than_expected_is_not_used(tmp_path, codec):
    store = TieredStore([DiskTier(tmp_path, 1 << 20, codec)])
    entry, chunks, _ = prompt("a", list(range(32)), 0)
    commit_entries(store, ListIndex(), [(entry, chunks)])
    claimed_tokens = entry.token_ids.copy()
    claimed_tokens[20] = 7  # as if a hash collided: key matches, tokens do not
    loaded = load_entry_kv(store, entry.keys, claimed_tokens, 16, SMALL)
    assert loaded.available.tolist() == [True] * 16 + [False] * 16


def test_load_checks_the_number_of_keys(tmp_path, codec):
    store = TieredStore([DiskTier(tmp_path, 1 << 20, codec)])
    with pytest.raises(ValueError, match="2 chunk keys for 40 tokens in chunks of 16; expected 3"):
        load_entry_kv(store, [b"\0" * 16] * 2, list(range(40)), 16, SMALL)


def test_reconciliation_finds_the_entries_whose_chunks_are_gone(tmp_path, codec):
    """A restart: the index was written by one process, the tiers lost some chunks, and
    another process (the connector's worker) checks without opening the index's mirror."""
    store = TieredStore([DiskTier(tmp_path / "chunks", 1 << 20, codec)])
    kept, lost = prompt("kept", list(range(40)), 0), prompt("lost", list(range(300, 340)), 1)
    store.put(kept[1] + lost[1])
    store.delete([lost[0].keys[-1]])
    with EntryIndex(tmp_path / "index", 4) as index:
        index.add([IndexEntry(e.name, "m", "", [1, 0, 0, 0], e.token_ids,
                              chunk_keys=[k.hex() for k in e.keys]) for e in (kept[0], lost[0])])
    refs = stored_chunk_keys(tmp_path / "index")
    assert refs == {e.name: [k.hex() for k in e.keys] for e in (kept[0], lost[0])}
    assert entries_missing_chunks(store, refs, batch_entries=1) == {"lost"}
    assert entries_missing_chunks(store, {"no-chunks": []}) == {"no-chunks"}
    assert stored_chunk_keys(tmp_path / "never-written") == {}


def test_a_chunk_of_another_model_under_our_key_is_not_served(tmp_path, codec):
    """A forged header (another model's KV written under our key) reads as a miss."""
    import dataclasses

    from kvshare.storage.commit import fetch_entry_chunks

    store = TieredStore([DiskTier(tmp_path, 1 << 20, codec)])
    entry, ours, _ = prompt("a", list(range(40)), 0)
    foreign = split_prompt_kv("other-model", random_kv(SMALL, 40, 1), entry.token_ids, 16,
                              scope="")
    store.put([dataclasses.replace(chunk, header=dataclasses.replace(chunk.header, key=key))
               for chunk, key in zip(foreign, entry.keys)])
    assert len(fetch_entry_chunks(store, entry.keys, entry.token_ids, 16, SMALL)) == 3
    assert fetch_entry_chunks(store, entry.keys, entry.token_ids, 16, SMALL,
                              model_id="m") == {}
