"""TieredStore: top-down reads with promotion, write-through, failures absorbed, threads."""

import random
import threading

import pytest
from kv_samples import assert_same_chunk, make_chunks

from kvshare.storage.disk_tier import DiskTier
from kvshare.storage.memory_tier import MemoryTier
from kvshare.storage.redis_tier import RedisTier
from kvshare.storage.tiered_store import TieredStore


@pytest.fixture
def store(tmp_path, codec, redis_server):
    s = TieredStore([MemoryTier.cpu(1 << 20), DiskTier(tmp_path, 1 << 20, codec),
                     RedisTier(redis_server.url, codec)])
    yield s
    s.close()


def held_by(store, key):
    return [tier.name for tier in store.tiers if tier.contains([key])[0]]


def test_put_writes_through_to_every_tier(store):
    chunks = make_chunks(32, 16)
    assert store.put(chunks) == [True, True]
    assert held_by(store, chunks[0].key) == ["cpu", "disk", "redis"]


def test_get_reads_top_down_and_promotes_hits(store):
    chunks = make_chunks(48, 16)
    cpu, disk, redis_tier = store.tiers
    redis_tier.put(chunks[:1])  # only in the slowest tier
    disk.put(chunks[1:2])
    got = store.get([c.key for c in chunks])
    assert_same_chunk(got[0], chunks[0])
    assert_same_chunk(got[1], chunks[1])
    assert got[2] is None
    assert held_by(store, chunks[0].key) == ["cpu", "disk", "redis"]
    assert held_by(store, chunks[1].key) == ["cpu", "disk"]  # never pushed downwards
    assert [store.stats()[t].hits for t in ("cpu", "disk", "redis")] == [0, 1, 1]
    store.get([chunks[0].key])
    assert store.stats()["cpu"].hits == 1  # second read served from the top


def test_contains_and_delete_span_all_tiers(store):
    chunks = make_chunks(32, 16)
    store.tiers[2].put(chunks[:1])
    assert store.contains([c.key for c in chunks]) == [True, False]
    store.put(chunks)
    store.delete([chunks[0].key])
    assert store.contains([c.key for c in chunks]) == [False, True]
    assert held_by(store, chunks[0].key) == []


def test_dead_redis_is_absorbed_by_the_other_tiers(store, redis_server):
    chunks = make_chunks(32, 16)
    redis_server.kill()
    assert store.put(chunks) == [True, True]  # cpu and disk took them
    for got, want in zip(store.get([c.key for c in chunks]), chunks):
        assert_same_chunk(got, want)
    stats = store.stats()
    assert not stats["redis"].healthy and stats["redis"].errors == 1
    assert stats["cpu"].healthy and stats["disk"].healthy


def test_store_reports_not_stored_when_every_tier_fails(tmp_path, codec, redis_server):
    (chunk,) = make_chunks(16, 16)
    store = TieredStore([MemoryTier.cpu(capacity_bytes=0), RedisTier(redis_server.url, codec)])
    redis_server.kill()
    assert store.put([chunk]) == [False]
    assert store.get([chunk.key]) == [None]


def test_duplicate_tier_names_are_rejected(codec, tmp_path):
    with pytest.raises(ValueError, match=r"\['cpu', 'cpu'\]"):
        TieredStore([MemoryTier.cpu(1), MemoryTier.cpu(1)])


def test_concurrent_writers_and_readers_never_see_wrong_data(tmp_path, codec, redis_server):
    pool = [c for seed in range(6) for c in make_chunks(64, 16, seed=seed)]  # 24 chunks
    by_key = {c.key: c for c in pool}
    chunk_bytes = max(c.nbytes for c in pool)
    disk_cap = 8 * len(codec.encode(pool[0])) + 4096
    # Small caps force constant eviction in both local tiers while threads race.
    cpu = MemoryTier.cpu(5 * chunk_bytes)
    disk = DiskTier(tmp_path, disk_cap, codec)
    store = TieredStore([cpu, disk, RedisTier(redis_server.url, codec)])
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        try:
            for _ in range(40):
                batch = rng.sample(pool, 3)
                if rng.random() < 0.5:
                    assert store.put(batch) == [True] * 3
                else:
                    for key, got in zip([c.key for c in batch], store.get([c.key for c in batch])):
                        if got is not None:
                            assert_same_chunk(got, by_key[key])
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    stats = store.stats()
    assert stats["cpu"].bytes_used <= 5 * chunk_bytes
    assert stats["disk"].bytes_used <= disk_cap
    files = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert not [n for n in files if n.endswith(".tmp")]
    assert sum(files.values()) == stats["disk"].bytes_used == disk.stats().bytes_used
    assert len(files) == stats["disk"].chunks
    assert all(stats[name].errors == 0 and stats[name].corrupt == 0 for name in stats)
    for key, got in zip(by_key, store.get(list(by_key))):  # Redis holds every chunk
        assert_same_chunk(got, by_key[key])
