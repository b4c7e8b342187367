"""The daemon's calls over its real socket: same answers as the catalog and store in the
process, chunks bit for bit, corrupt chunks refused, admin dispatch, start-up rules."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from kv_samples import assert_same_chunk, make_chunks
from remote_helpers import MODEL, SMOLLM2, daemon_config, edited, entry_for

from kvshare.catalog import LoadOutcome
from kvshare.remote import protocol as wire
from kvshare.remote.client import DaemonCallError, DaemonClient, RemoteCatalog, RemoteStore
from kvshare.remote.server import Daemon, DaemonStartError
from kvshare.storage.chunk import KVChunk, split_prompt_kv


def test_remote_lookup_equals_the_daemons_own(daemon, config, prompts, tokenizer):
    catalog = RemoteCatalog.connect(config)
    entries = [entry_for(daemon.catalog.embedder, text, ids, scope) for (text, ids), scope
               in zip(prompts, ["", "acme"] * len(prompts))]
    catalog.commit(entries[:-2], kv_bytes_per_token=SMOLLM2.bytes_per_token())
    in_flight = entries[-2:]  # competing like indexed ones, as the scheduler sends them
    for i, (text, _) in enumerate(prompts[:6]):  # even ones are public, odd ones acme's
        query = edited(text)
        ids = tokenizer(query, add_special_tokens=False)["input_ids"]
        for tenant in ("", "acme"):
            remote = catalog.lookup(MODEL, query, ids, tenant, in_flight)
            local = daemon.catalog.lookup(MODEL, query, ids, tenant, in_flight)
            assert remote.plan.runs == local.plan.runs
            assert np.array_equal(remote.plan.recompute, local.plan.recompute)
            assert (remote.plan.reused_tokens > 0) == (tenant == "acme" or i % 2 == 0)
            assert [(h.entry.entry_id, h.distance) for h in remote.hits] == \
                [(h.entry.entry_id, h.distance) for h in local.hits]
            for got, want in zip(remote.hits, local.hits):
                assert np.array_equal(got.entry.token_ids, want.entry.token_ids)
                assert np.array_equal(got.entry.embedding, want.entry.embedding)
                assert got.entry.chunk_keys == want.entry.chunk_keys
            assert np.array_equal(remote.embedding, local.embedding)
    query = edited(prompts[-2][0])  # an entry still in flight (public) is planned from
    ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    assert in_flight[0].entry_id in catalog.lookup(MODEL, query, ids, "", in_flight
                                                   ).plan.source_entries
    catalog.record_hits([entries[0].entry_id])
    assert daemon.catalog.index.get([entries[0].entry_id])[0].hit_count == 1
    catalog.drop([entries[0].entry_id])
    assert entries[0].entry_id not in daemon.catalog.index
    catalog.report_load(LoadOutcome("acme", claimed=100, reused=80, recomputed=20,
                                    fallback=False))
    catalog.close()


def test_put_get_contains_delete_round_trip_bit_for_bit(daemon, config):
    store = RemoteStore.connect(config)
    kv = torch.randn(SMOLLM2.shape(600)).to(torch.bfloat16)
    chunks = split_prompt_kv(MODEL, kv, list(range(600)), 256, scope="")  # views, not contiguous
    keys = [chunk.key for chunk in chunks]
    absent = make_chunks(8, 8, seed=9)[0].key
    assert store.contains(keys + [absent]) == [False] * 4
    assert store.put(chunks) == [True] * 3
    assert store.contains(keys + [absent]) == [True, True, True, False]
    got = store.get([keys[2], absent, keys[0], keys[1]])
    assert got[1] is None
    for chunk, want in zip([got[0], got[2], got[3]], [chunks[2], chunks[0], chunks[1]]):
        assert_same_chunk(chunk, want)
    assert set(store.stats()) == {"cpu", "disk"}
    assert store.stats()["cpu"].chunks == 3
    store.delete(keys[:1])
    assert store.contains(keys) == [False, True, True]
    store.close()


def test_a_corrupt_payload_frame_is_refused_and_never_served(daemon, config, client):
    (chunk,) = make_chunks(16, 16)
    (head,), (payload,) = wire.chunk_parts([chunk])
    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 0x01
    stored, _ = client.call(wire.Put([head]), [memoryview(damaged)])
    assert stored == [False]
    store = RemoteStore.connect(config)
    assert store.contains([chunk.key]) == [False]
    assert store.get([chunk.key]) == [None]
    assert store.put([chunk]) == [True]
    assert_same_chunk(store.get([chunk.key])[0], chunk)
    store.close()


def test_a_reply_damaged_on_the_way_reads_as_a_miss(daemon, config, monkeypatch):
    store = RemoteStore(DaemonClient.from_config(config), shared_memory=False)  # frames
    (chunk,) = make_chunks(16, 16)
    assert store.put([chunk]) == [True]
    real_call = DaemonClient.call

    class Damaged:
        def __init__(self, frame) -> None:
            data = bytearray(frame.buffer)
            data[-1] ^= 0x80
            self.buffer = memoryview(data)

    def damaging_call(self, call, payloads=(), timeout_ms=None):
        result, frames = real_call(self, call, payloads, timeout_ms)
        return result, [Damaged(frame) for frame in frames]

    monkeypatch.setattr(DaemonClient, "call", damaging_call)
    assert store.get([chunk.key]) == [None]
    store.close()


def test_daemon_errors_reach_the_caller_with_the_daemons_message(daemon, client):
    with pytest.raises(DaemonCallError, match="chunk key '00' is 1 bytes"):
        client.call(wire.Contains([b"\0"]))
    assert client.ping()["version"] == wire.PROTOCOL_VERSION  # still serving


class StandInAdmin:
    """The admin contract: methods, and REMOTE_METHODS naming the callable ones."""

    REMOTE_METHODS = ("show", "stats")

    def __init__(self, catalog, store) -> None:
        self.catalog = catalog

    def stats(self) -> dict:
        return {"entries": len(self.catalog.index)}

    def show(self, entry_id: str) -> dict:
        (entry,) = self.catalog.index.get([entry_id])
        return {"entry_id": entry.entry_id, "tokens": entry.token_ids}

    def purge(self, tenant: str) -> int:
        raise AssertionError("purge is not remote; the daemon must not call it")


def test_admin_calls_only_remote_methods(config, prompts, client):
    served = Daemon(config, admin_factory=StandInAdmin)
    served.start()
    try:
        text, ids = prompts[0]
        entry = entry_for(served.catalog.embedder, text, ids)
        served.catalog.commit([entry], SMOLLM2.bytes_per_token())
        assert client.admin("stats") == {"entries": 1}
        shown = client.admin("show", entry_id=entry.entry_id, timeout_ms=30_000)
        assert shown["entry_id"] == entry.entry_id
        assert np.array_equal(shown["tokens"], ids)
        with pytest.raises(DaemonCallError, match="'purge' is not callable remotely"):
            client.admin("purge", tenant="acme")
        with pytest.raises(DaemonCallError, match="TypeError"):
            client.admin("show", wrong="x")
    finally:
        served.close()


def test_the_ipc_socket_is_private_and_removed_on_close(config):
    served = Daemon(config)
    served.start()
    path = Path(config.daemon_endpoint[len("ipc://"):])
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    served.close()
    assert not path.exists()


def test_a_second_daemon_on_a_live_address_refuses_to_start(daemon, config, tmp_path):
    other_home = daemon_config(tmp_path / "other", daemon_address=config.daemon_endpoint)
    with pytest.raises(DaemonStartError, match="another kvshare daemon is live on ipc://"):
        Daemon(other_home).start()
    with pytest.raises(DaemonStartError, match=r"another kvshare daemon \(pid \d+\) serves"):
        Daemon(config)
    assert DaemonClient.from_config(config).ping()["pid"] > 0  # the first one still serves


def test_a_stale_socket_file_is_taken_over(config, client):
    path = Path(config.daemon_endpoint[len("ipc://"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a socket file nobody listens on, as a killed daemon leaves it
    dead.close()
    served = Daemon(config)
    served.start()
    try:
        assert client.ping()["address"] == config.daemon_endpoint
    finally:
        served.close()


def test_chunks_survive_as_views_of_their_frames(daemon, config):
    """A fetched chunk's tensor is usable after the reply is gone (it owns its frame)."""
    store = RemoteStore.connect(config)
    chunk = make_chunks(40, 40, layout=SMOLLM2)[0]
    chunk = KVChunk(chunk.header, chunk.kv.contiguous())
    store.put([chunk])
    (got,) = store.get([chunk.key])
    store.close()
    assert_same_chunk(got, chunk)


def test_lookups_and_load_reports_reach_the_metrics(tmp_path):
    import urllib.request

    from kvshare.storage.redis_server import free_port

    port = free_port()
    config = daemon_config(tmp_path / "home", metrics_port=port)
    served = Daemon(config)
    served.start()
    try:
        catalog = RemoteCatalog.connect(config)
        catalog.lookup(MODEL, "nothing indexed yet", list(range(50)), "")
        catalog.report_load(LoadOutcome("acme", claimed=100, reused=80, recomputed=20,
                                        fallback=False))
        catalog.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode()
        assert 'kvshare_lookups_total{outcome="miss",tenant="public"} 1.0' in text
        assert 'kvshare_reused_tokens_total{tenant="acme"} 80.0' in text
    finally:
        served.close()
