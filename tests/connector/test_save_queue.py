"""The write-behind save queue: every job is answered, memory is bounded, saves wait.

Real tiers (a CPU tier and a disk directory); a tier whose writes wait on an event stands
in for a slow disk, and one that raises for a broken one (fault injection).
"""

from __future__ import annotations

import threading

import torch

from kvshare.connector.save_queue import SaveJob, SaveQueue
from kvshare.storage.chunk import KVLayout
from kvshare.storage.codec import ChunkCodec
from kvshare.storage.disk_tier import DiskTier
from kvshare.storage.keys import chunk_keys
from kvshare.storage.memory_tier import MemoryTier
from kvshare.storage.tiered_store import TieredStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
CHUNK = 16


def job(name: str, num_tokens: int = 40, scope: str = "t") -> SaveJob:
    kv = torch.randn(LAYOUT.shape(num_tokens)).to(LAYOUT.dtype)
    return SaveJob(name, kv, list(range(num_tokens)), scope, f"entry-{name}",
                   exact_tokens=num_tokens)


class GatedTier(MemoryTier):
    """A CPU tier whose writes wait until ``gate`` is set (a slow disk)."""

    def __init__(self) -> None:
        super().__init__(1 << 30)
        self.gate, self.entered = threading.Event(), threading.Event()

    def _put(self, chunks):
        self.entered.set()
        self.gate.wait()
        return super()._put(chunks)


def test_every_job_is_stored_and_answered_with_its_keys(tmp_path):
    store = TieredStore([MemoryTier.cpu(1 << 30),
                         DiskTier(tmp_path, 1 << 30, ChunkCodec("zstd-byteplane"))])
    queue = SaveQueue(store, "m", CHUNK, capacity_bytes=1 << 20)
    jobs = [job("a"), job("b", scope="u")]
    for one in jobs:
        queue.submit(one)
    queue.drain()
    results = {r.req_id: r.chunk_keys for r in queue.take_results()}
    for one in jobs:
        expected = [k.hex() for k in chunk_keys("m", one.token_ids, CHUNK, scope=one.scope)]
        assert results[one.req_id] == expected
        assert all(store.contains([bytes.fromhex(k) for k in expected]))
    assert queue.take_results() == [] and queue.queued_bytes == 0
    queue.close()


def test_a_failing_store_is_answered_as_not_stored(monkeypatch):
    store = TieredStore([MemoryTier.cpu(1 << 30)])

    def broken(chunks):
        raise OSError("injected: disk gone")

    monkeypatch.setattr(store, "put", broken)
    queue = SaveQueue(store, "m", CHUNK, capacity_bytes=1 << 20)
    queue.submit(job("a"))
    queue.drain()
    assert [(r.req_id, r.chunk_keys) for r in queue.take_results()] == [("a", None)]
    queue.close()


def test_a_full_queue_makes_the_next_save_wait():
    tier = GatedTier()
    one = job("a")
    queue = SaveQueue(TieredStore([tier]), "m", CHUNK, capacity_bytes=one.nbytes)
    queue.submit(one)  # fits the bound exactly
    tier.entered.wait()  # the writer holds it, blocked in the tier
    submitted = threading.Event()

    def second() -> None:
        queue.submit(job("b"))
        submitted.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    assert not submitted.wait(timeout=0.5), "a save past the byte bound did not wait"
    assert queue.queued_bytes == one.nbytes
    tier.gate.set()
    waiter.join()
    queue.drain()
    assert sorted(r.req_id for r in queue.take_results()) == ["a", "b"]
    queue.close()


def test_close_writes_what_is_queued():
    tier = GatedTier()
    queue = SaveQueue(TieredStore([tier]), "m", CHUNK, capacity_bytes=1 << 30)
    queue.submit(job("a"))
    queue.submit(job("b"))
    tier.gate.set()
    queue.close()
    assert sorted(r.req_id for r in queue.take_results()) == ["a", "b"]


def test_chunks_are_readable_from_the_queue_until_the_tiers_hold_them():
    tier = GatedTier()
    queue = SaveQueue(TieredStore([tier]), "m", CHUNK, capacity_bytes=1 << 30)
    one = job("a")
    queue.submit(one)
    tier.entered.wait()  # being written, blocked in the tier
    keys = chunk_keys("m", one.token_ids, CHUNK, scope=one.scope)
    queued = queue.get(keys + [bytes(16)])
    assert [c.key for c in queued[:-1]] == keys and queued[-1] is None
    assert not any(tier.contains(keys))
    tier.gate.set()
    queue.drain()
    assert all(tier.contains(keys))
    assert [c.key for c in queue.get(keys)] == keys  # now from the tier
    queue.close()
