"""Gets through the daemon's shared-memory arena: chunks bit for bit without a payload
frame, a private arena removed on close, damage read as a miss, the GRACE invariant over
the socket, a restarted daemon's new arena, and frames for clients that do not opt in."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch
from kv_samples import assert_same_chunk
from remote_helpers import MODEL, SMOLLM2, daemon_config

from kvshare.remote import protocol as wire
from kvshare.remote.client import DaemonClient, RemoteStore
from kvshare.remote.server import Daemon
from kvshare.storage.chunk import KVChunk, split_prompt_kv
from kvshare.storage.memory_tier import SharedMemoryTier
from kvshare.storage.shm_arena import SHM_DIR, owner_tag


def prompt_chunks(num_tokens: int, seed: int = 0) -> list[KVChunk]:
    """SmolLM2-sized chunks of 256 tokens (5.9 MB each), as views of one prompt's KV."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(SMOLLM2.shape(num_tokens), generator=gen).to(torch.bfloat16)
    ids = [seed * 10_000 + i for i in range(num_tokens)]
    return split_prompt_kv(MODEL, kv, ids, 256, scope="")


def shared_tier(daemon: Daemon) -> SharedMemoryTier:
    (tier,) = [t for t in daemon.store.tiers if isinstance(t, SharedMemoryTier)]
    return tier


def test_gets_map_the_arena_bit_for_bit_without_payload_frames(daemon, config, client):
    chunks = prompt_chunks(600)
    store = RemoteStore.connect(config)
    assert store.shared_memory
    assert store.put(chunks) == [True] * 3
    got = store.get([c.key for c in reversed(chunks)])
    for g, want in zip(got, reversed(chunks)):
        assert_same_chunk(g, want)
    answers, frames = client.call(wire.Get([chunks[0].key], shared_memory=True))
    assert isinstance(answers[0], wire.SharedChunk) and frames == []
    assert answers[0].arena == str(shared_tier(daemon).arena.path)
    answers, frames = client.call(wire.Get([chunks[0].key]))  # not opted in: a frame
    assert isinstance(answers[0], bytes) and len(frames) == 1
    framed = RemoteStore(client, shared_memory=False).get([c.key for c in chunks])
    for g, want in zip(framed, chunks):
        assert_same_chunk(g, want)
    store.close()


def test_the_arena_is_private_named_for_the_home_and_removed_on_close(config):
    served = Daemon(config)
    path = shared_tier(served).arena.path
    assert path.parent == SHM_DIR
    assert path.name.startswith(f"kvshare-arena-{owner_tag(config.home_dir.resolve())}-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == config.cpu_bytes
    served.start()
    served.close()
    assert not path.exists()


def test_a_damaged_arena_range_reads_as_a_miss_never_served(daemon, config):
    (chunk,) = prompt_chunks(256)
    store = RemoteStore.connect(config)
    store.put([chunk])
    tier = shared_tier(daemon)
    (held,) = tier.get([chunk.key])
    offset = tier.locate(held).offset
    tier.arena.view(offset + chunk.nbytes // 2, 1).bitwise_xor_(0x10)
    assert store.get([chunk.key]) == [None]
    assert RemoteStore(store.client, shared_memory=False).get([chunk.key]) == [None]
    tier.arena.view(offset + chunk.nbytes // 2, 1).bitwise_xor_(0x10)  # repaired: served
    assert_same_chunk(store.get([chunk.key])[0], chunk)
    store.close()


def test_a_chunk_read_then_deleted_stays_intact_while_the_tier_refills(daemon, config):
    """The GRACE invariant through the daemon: the view a client got is not reused for
    other chunks right after the get, even once the chunk left the tier."""
    store = RemoteStore.connect(config)
    (first,) = prompt_chunks(256)
    store.put([first])
    (read,) = store.get([first.key])
    store.delete([first.key])
    capacity_chunks = config.cpu_bytes // first.nbytes
    for seed in range(1, capacity_chunks + 2):  # more than the tier holds: it evicts
        assert store.put(prompt_chunks(256, seed=seed)) == [True]
    assert shared_tier(daemon).stats().evictions > 0
    assert_same_chunk(read, first)
    store.close()


def test_a_restarted_daemon_with_a_new_arena_is_read_by_the_same_client(config):
    chunks = prompt_chunks(300)
    store = RemoteStore.connect(config)
    served = Daemon(config)
    served.start()
    try:
        store.put(chunks)
        assert_same_chunk(store.get([chunks[0].key])[0], chunks[0])
        before = store.arena_path
    finally:
        served.close()
    served = Daemon(config)  # same home: disk chunks survive, the CPU tier is new
    served.start()
    try:
        after = str(shared_tier(served).arena.path)
        assert after != before
        assert_same_chunk(store.get([chunks[0].key])[0], chunks[0])  # from disk, promoted
        for got, want in zip(store.get([c.key for c in chunks]), chunks):
            assert_same_chunk(got, want)
        assert store.arena_path == after  # read through the new arena
    finally:
        served.close()
    store.close()


def test_tcp_clients_never_ask_for_shared_memory(tmp_path):
    config = daemon_config(tmp_path / "home", daemon_address="tcp://127.0.0.1:1",
                           daemon_secret="correct horse battery staple")
    client = DaemonClient.from_config(config)
    assert not RemoteStore(client).shared_memory
    with pytest.raises(ValueError, match="shared_memory=True needs an ipc:// daemon"):
        RemoteStore(client, shared_memory=True)


def test_a_daemon_without_room_in_shm_serves_frames(tmp_path, monkeypatch):
    """No room for the arena: a plain CPU tier, and clients get frames as before."""
    import kvshare.tiers_setup as tiers_setup

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiers_setup, "ShmArena", no_room)
    config = daemon_config(tmp_path / "home")
    served = Daemon(config)
    served.start()
    try:
        assert not any(isinstance(t, SharedMemoryTier) for t in served.store.tiers)
        (chunk,) = prompt_chunks(100)
        store = RemoteStore.connect(config)
        store.put([chunk])
        assert_same_chunk(store.get([chunk.key])[0], chunk)
        store.close()
    finally:
        served.close()
    assert not list(Path(SHM_DIR).glob(f"kvshare-arena-{owner_tag(config.home_dir)}-*"))
