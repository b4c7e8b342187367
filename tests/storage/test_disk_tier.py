"""Disk tier: atomic files, byte-capped LRU, survives restarts, never returns damaged bytes."""

import errno
import os
import time

import pytest
from kv_samples import assert_same_chunk, make_chunks

from kvshare.storage.disk_tier import STALE_TEMP_S, DiskTier


def files(root, pattern="*"):
    return sorted(p.name for p in root.glob(pattern))


def test_round_trip_one_file_per_chunk(tmp_path, codec):
    chunks = make_chunks(40, 16)
    tier = DiskTier(tmp_path, 1 << 20, codec)
    assert tier.put(chunks) == [True] * 3
    assert files(tmp_path) == sorted(f"{c.key.hex()}.kvc" for c in chunks)
    for got, want in zip(tier.get([c.key for c in chunks]), chunks):
        assert_same_chunk(got, want)
    stats = tier.stats()
    assert stats.bytes_used == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert (stats.chunks, stats.hits) == (3, 3)


def test_lru_eviction_keeps_file_bytes_under_the_cap(tmp_path, codec):
    chunks = make_chunks(16 * 6, 16)
    tier = DiskTier(tmp_path, 1 << 20, codec)
    tier.put(chunks[:1])
    size = tier.stats().bytes_used
    tier = DiskTier(tmp_path / "capped", int(3.5 * size), codec)
    tier.put(chunks[:3])
    tier.get([chunks[0].key])  # order, LRU first: 1, 2, 0
    tier.put(chunks[3:5])  # evicts 1 then 2
    assert tier.contains([c.key for c in chunks]) == [True, False, False, True, True, False]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "capped").iterdir())
    assert on_disk == tier.stats().bytes_used <= int(3.5 * size)
    assert tier.stats().evictions == 2


def test_restart_keeps_chunks(tmp_path, codec):
    chunks = make_chunks(16 * 3, 16)
    tier = DiskTier(tmp_path, 1 << 20, codec)
    tier.put(chunks)
    used = tier.stats().bytes_used

    reopened = DiskTier(tmp_path, 1 << 20, codec)
    assert (reopened.stats().bytes_used, reopened.stats().chunks) == (used, 3)
    for got, want in zip(reopened.get([c.key for c in chunks]), chunks):
        assert_same_chunk(got, want)


def test_restart_keeps_recency_order(tmp_path, codec):
    chunks = make_chunks(16 * 3, 16)
    tier = DiskTier(tmp_path, 1 << 20, codec)
    tier.put(chunks)
    tier.get([chunks[0].key])  # LRU order now 1, 2, 0
    two_largest = sum(sorted(p.stat().st_size for p in tmp_path.iterdir())[-2:])

    # Reopening with room for two chunks evicts the least recent one before the restart.
    shrunk = DiskTier(tmp_path, two_largest, codec)
    assert shrunk.contains([c.key for c in chunks]) == [True, False, True]
    assert shrunk.stats().evictions == 1


def test_restart_removes_stray_temp_files_and_ignores_foreign_files(tmp_path, codec):
    (chunk,) = make_chunks(16, 16)
    DiskTier(tmp_path, 1 << 20, codec).put([chunk])
    stray = tmp_path / f".{chunk.key.hex()}.abc.tmp"
    stray.write_bytes(b"half a chunk")
    old = time.time() - STALE_TEMP_S - 1
    os.utime(stray, (old, old))
    in_flight = tmp_path / f".{chunk.key.hex()}.def.tmp"  # another process writing now
    in_flight.write_bytes(b"a third of a chunk")
    (tmp_path / "notes.txt").write_text("not a chunk")
    tier = DiskTier(tmp_path, 1 << 20, codec)
    assert files(tmp_path, "*.tmp") == files(tmp_path, ".*") == [in_flight.name]
    assert tier.stats().chunks == 1
    assert (tmp_path / "notes.txt").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_damaged_file_is_detected_dropped_and_never_returned(tmp_path, codec, damage):
    chunks = make_chunks(32, 16)
    tier = DiskTier(tmp_path, 1 << 20, codec)
    tier.put(chunks)
    path = tmp_path / f"{chunks[0].key.hex()}.kvc"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(data)
    elif damage == "truncate":
        path.write_bytes(data[:-100])
    else:  # a valid chunk under the wrong name
        path.write_bytes((tmp_path / f"{chunks[1].key.hex()}.kvc").read_bytes())
    assert tier.get([chunks[0].key]) == [None]
    assert not path.exists()
    stats = tier.stats()
    assert (stats.corrupt, stats.chunks) == (1, 1)
    assert_same_chunk(tier.get([chunks[1].key])[0], chunks[1])


def test_enospc_fails_only_the_new_chunk(tmp_path, codec, monkeypatch):
    first, second = make_chunks(32, 16)
    tier = DiskTier(tmp_path, 1 << 20, codec)
    tier.put([first])
    before = tier.stats()

    real_write = os.write

    def disk_full_midway(fd, data):
        if len(data) > 64:  # let part of the chunk land, then fill up
            return real_write(fd, bytes(data[:64]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_full_midway)
    assert tier.put([second]) == [False]  # no exception reaches the caller
    monkeypatch.undo()
    failed = tier.stats()
    assert failed.errors == 1 and not failed.healthy and "No space left" in failed.last_error

    assert files(tmp_path) == [f"{first.key.hex()}.kvc"]  # no partial or temp file left
    assert_same_chunk(tier.get([first.key])[0], first)
    assert tier.get([second.key]) == [None]
    assert tier.stats().bytes_used == before.bytes_used
    assert not tier.stats().healthy  # reads work, writes have not: still failing
    assert tier.put([second]) == [True]  # space is back
    assert tier.stats().healthy


def test_fsync_failure_leaves_no_file_and_no_accounting(tmp_path, codec, monkeypatch):
    (chunk,) = make_chunks(16, 16)
    tier = DiskTier(tmp_path, 1 << 20, codec)

    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert tier.put([chunk]) == [False]
    assert files(tmp_path) == [] and tier.stats().bytes_used == 0


def test_file_deleted_behind_the_tiers_back_is_a_plain_miss(tmp_path, codec):
    (chunk,) = make_chunks(16, 16)
    tier = DiskTier(tmp_path, 1 << 20, codec)
    tier.put([chunk])
    (tmp_path / f"{chunk.key.hex()}.kvc").unlink()
    assert tier.get([chunk.key]) == [None]
    stats = tier.stats()
    assert (stats.chunks, stats.bytes_used, stats.corrupt, stats.errors) == (0, 0, 0, 0)


def test_delete_removes_files(tmp_path, codec):
    chunks = make_chunks(32, 16)
    tier = DiskTier(tmp_path, 1 << 20, codec)
    tier.put(chunks)
    assert tier.delete([chunks[0].key]) == 1
    assert files(tmp_path) == [f"{chunks[1].key.hex()}.kvc"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_check_reads_every_byte_and_drops_damaged_files(tmp_path, codec, damage):
    chunks = make_chunks(48, 16)
    tier = DiskTier(tmp_path, 1 << 20, codec)
    tier.put(chunks)
    assert sorted(tier.keys()) == sorted(c.key for c in chunks)
    path = tmp_path / f"{chunks[2].key.hex()}.kvc"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-1] ^= 0x80
    else:
        del data[-1:]
    path.write_bytes(data)
    order_before = list(tier.keys())
    checks = tier.check([c.key for c in chunks] + [b"\0" * 16])
    assert [(c.held, bool(c.damage)) for c in checks] == [
        (True, False), (True, False), (True, True), (False, False)]
    assert not path.exists() and chunks[2].key not in set(tier.keys())
    stats = tier.stats()
    assert (stats.corrupt, stats.chunks, stats.hits, stats.misses) == (1, 2, 0, 0)
    assert list(tier.keys()) == [k for k in order_before if k != chunks[2].key]  # LRU order kept


def test_without_evict_at_open_a_smaller_cap_deletes_nothing_until_a_put(tmp_path, codec):
    chunks = make_chunks(16 * 4, 16)
    DiskTier(tmp_path, 1 << 20, codec).put(chunks[:3])
    used = sum(p.stat().st_size for p in tmp_path.iterdir())
    cap = used // 2
    tier = DiskTier(tmp_path, cap, codec, evict_at_open=False)
    assert tier.stats().chunks == 3 and tier.stats().bytes_used == used > cap
    assert len(files(tmp_path, "*.kvc")) == 3
    assert tier.put(chunks[3:]) == [True]  # room is made now: the cap holds again
    assert tier.stats().bytes_used <= cap and tier.contains([chunks[3].key]) == [True]
