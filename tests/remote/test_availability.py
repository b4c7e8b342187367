"""The daemon away, late, restarted, or reached over TCP: callers never wait past the
timeout, read misses, reconnect by themselves, and find what the daemon held before."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kv_samples import assert_same_chunk, make_chunks
from remote_helpers import (
    FAST_TIMEOUT_MS,
    MODEL,
    SMOLLM2,
    DaemonProcess,
    daemon_config,
    edited,
    entry_for,
    wait_until_up,
)

from kvshare.remote import protocol as wire
from kvshare.remote.client import DaemonClient, DaemonUnavailable, RemoteCatalog, RemoteStore
from kvshare.remote.server import Daemon
from kvshare.storage.chunk import split_prompt_kv
from kvshare.storage.codec import ChunkCodec
from kvshare.storage.index import IndexEntry
from kvshare.storage.redis_server import RedisServer, free_port
from kvshare.storage.redis_tier import RedisTier

LIMIT_S = FAST_TIMEOUT_MS / 1e3 + 1.0
"""A failing call returns within its timeout; one second of slack for a busy machine."""


def timed(fn):
    started = time.monotonic()
    try:
        return fn(), time.monotonic() - started
    except Exception as exc:
        return exc, time.monotonic() - started


def test_no_daemon_calls_fail_within_the_timeout_and_the_store_reads_misses(tmp_path, caplog):
    config = daemon_config(tmp_path / "home", daemon_timeout_ms=FAST_TIMEOUT_MS)
    catalog = RemoteCatalog.connect(config)  # connecting never waits for the daemon
    store = RemoteStore.connect(config)
    result, seconds = timed(lambda: catalog.lookup(MODEL, "hello", [1, 2, 3], ""))
    assert isinstance(result, DaemonUnavailable) and seconds < LIMIT_S
    entry = IndexEntry("e1", MODEL, "", np.ones(4, np.float32) / 2, list(range(40)))
    result, seconds = timed(lambda: catalog.commit([entry], 1))
    assert isinstance(result, DaemonUnavailable) and seconds < LIMIT_S
    (chunk,) = make_chunks(16, 16)
    with caplog.at_level(logging.WARNING, logger="kvshare.remote.client"):
        for _ in range(3):
            assert timed(lambda: store.get([chunk.key]))[0] == [None]
            assert timed(lambda: store.put([chunk]))[0] == [False]
            assert timed(lambda: store.contains([chunk.key]))[0] == [False]
        assert store.stats() == {}
    outage_lines = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(outage_lines) == 1  # one line per outage, not per call
    catalog.close()
    store.close()


def test_a_daemon_started_later_is_used_by_the_same_clients(tmp_path, caplog):
    config = daemon_config(tmp_path / "home", daemon_timeout_ms=FAST_TIMEOUT_MS)
    store = RemoteStore.connect(config)
    (chunk,) = make_chunks(16, 16)
    assert store.put([chunk]) == [False]
    served = Daemon(config)
    served.start()
    try:
        wait_until_up(store.client)
        with caplog.at_level(logging.INFO, logger="kvshare.remote.client"):
            assert store.put([chunk]) == [True]
        assert any("answers again" in r.getMessage() for r in caplog.records)
        assert_same_chunk(store.get([chunk.key])[0], chunk)
    finally:
        served.close()
    assert store.get([chunk.key]) == [None]  # gone again: misses, within the timeout
    store.close()


def test_sigterm_flushes_and_a_restart_finds_entries_disk_and_redis_chunks(
        tmp_path, prompts, tokenizer, wordllama):
    with RedisServer() as redis:
        config = daemon_config(tmp_path / "home", redis_url=redis.url)
        daemon = DaemonProcess(config, tmp_path / "daemon.yaml").start()
        try:
            catalog, store = RemoteCatalog.connect(config), RemoteStore.connect(config)
            wait_until_up(store.client)
            entries, chunks = [], []
            for text, ids in prompts[:3]:
                entry = entry_for(wordllama, text, ids)
                kv = torch.randn(SMOLLM2.shape(len(ids))).to(torch.bfloat16)
                entry_chunks = split_prompt_kv(MODEL, kv, ids, 256, scope="",
                                               variant=entry.entry_id)
                assert [c.key.hex() for c in entry_chunks] == entry.chunk_keys
                assert store.put(entry_chunks) == [True] * len(entry_chunks)
                entries.append(entry)
                chunks += entry_chunks
            catalog.commit(entries, SMOLLM2.bytes_per_token())
            assert daemon.terminate() == 0  # right after the commit: nothing waited for a flush
            assert not Path(config.daemon_endpoint[len("ipc://"):]).exists()

            redis_tier = RedisTier(redis.url, ChunkCodec())
            assert redis_tier.contains([c.key for c in chunks]) == [True] * len(chunks)
            redis_tier.close()

            daemon.start()
            wait_until_up(store.client)
            stats = store.client.stats()
            assert stats.index["entries"] == len(entries)
            assert stats.tiers["cpu"].chunks == 0  # a fresh process: only disk and Redis
            for got, want in zip(store.get([c.key for c in chunks]), chunks):
                assert_same_chunk(got, want)
            query = edited(prompts[1][0])
            ids = tokenizer(query, add_special_tokens=False)["input_ids"]
            plan = catalog.lookup(MODEL, query, ids, "").plan
            assert entries[1].entry_id in plan.source_entries
            assert daemon.terminate() == 0
            catalog.close()
            store.close()
        finally:
            daemon.kill()


@pytest.fixture
def tcp_config(tmp_path):
    return daemon_config(tmp_path / "home", daemon_address=f"tcp://127.0.0.1:{free_port()}",
                         daemon_secret="correct horse battery staple")


def test_tcp_admits_only_clients_with_the_secret(tcp_config):
    served = Daemon(tcp_config)
    served.start()
    try:
        with_secret = DaemonClient.from_config(tcp_config)
        wait_until_up(with_secret)
        (chunk,) = make_chunks(16, 16)
        store = RemoteStore(with_secret)
        assert store.put([chunk]) == [True]
        assert_same_chunk(store.get([chunk.key])[0], chunk)

        wrong = DaemonClient(tcp_config.daemon_endpoint, secret="wrong horse battery staple",
                             timeout_ms=FAST_TIMEOUT_MS)
        for call in (wire.Ping(), wire.Get([chunk.key])):
            result, seconds = timed(lambda call=call: wrong.call(call))
            assert isinstance(result, DaemonUnavailable) and seconds < LIMIT_S

        import zmq

        ctx = zmq.Context()
        plain = ctx.socket(zmq.DEALER)  # no CURVE at all: the handshake cannot even start
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(tcp_config.daemon_endpoint)
        plain.send_multipart([wire.ENCODER.encode(wire.Envelope(
            wire.PROTOCOL_VERSION, 1, wire.Get([chunk.key])))])
        assert plain.poll(FAST_TIMEOUT_MS) == 0  # nothing comes back
        plain.close()
        ctx.term()
        wrong.close()
        assert with_secret.ping()["version"] == wire.PROTOCOL_VERSION
        store.close()
    finally:
        served.close()
