"""Redis tier against a real redis-server and a real 3-master Redis Cluster: round trip,
TTL, damage, eviction, crashes; then what only a cluster has (keys over masters, stats
from every master, one master lost)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
import torch
from kv_samples import SMALL, assert_same_chunk, make_chunks
from redis.cluster import RedisCluster

from kvshare.config import ConfigError, KVShareConfig
from kvshare.storage.commit import load_entry_kv
from kvshare.storage.redis_server import RedisClusterServers, RedisServer
from kvshare.storage.redis_tier import RedisTier
from kvshare.storage.redis_url import parse_cluster_url
from kvshare.storage.tiered_store import TieredStore

PREFIX = b"kvshare:chunk:"


@dataclass
class Target:
    """One server or one cluster, seen the same way by the tests."""

    servers: RedisServer | RedisClusterServers

    @property
    def url(self) -> str:
        return self.servers.url

    def client(self) -> redis.Redis | RedisCluster:
        """An outside client (not the tier's): the cluster's routes keys by slot."""
        if isinstance(self.servers, RedisServer):
            return redis.Redis.from_url(self.url)
        return RedisCluster(host="127.0.0.1", port=self.servers.ports[0])

    def keys(self) -> list[bytes]:
        """Every key on every server, asked of each server alone."""
        if isinstance(self.servers, RedisServer):
            return redis.Redis.from_url(self.url).keys("*")
        return [name for i in range(len(self.servers.servers))
                for name in self.servers.node_client(i).keys("*")]

    def kill(self) -> None:
        """Every server down, as a crash of the whole deployment would."""
        self.servers.kill()

    def start(self) -> None:
        self.servers.start()


def start_target(kind: str, maxmemory_bytes: int = 0) -> RedisServer | RedisClusterServers:
    if kind == "server":
        return RedisServer(maxmemory_bytes=maxmemory_bytes)
    return RedisClusterServers(masters=3, maxmemory_bytes=maxmemory_bytes)


@pytest.fixture(params=["server", "cluster"])
def target(request) -> Iterator[Target]:
    """A fresh redis-server, or a fresh 3-master Redis Cluster, on free ports."""
    with start_target(request.param) as servers:
        yield Target(servers)


@pytest.fixture
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers(masters=3, maxmemory_bytes=64 << 20) as servers:
        yield servers


# -- one server and a cluster alike ----------------------------------------------------

@pytest.mark.parametrize("pipeline_bytes", [1, 4 << 20], ids=["pipeline-per-chunk", "one-pipeline"])
def test_round_trip_one_key_per_chunk(target, codec, pipeline_bytes):
    chunks = make_chunks(40, 16)
    tier = RedisTier(target.url, codec, pipeline_bytes=pipeline_bytes)
    assert tier.put(chunks) == [True] * 3
    client = target.client()
    assert sorted(target.keys()) == sorted(PREFIX + c.key for c in chunks)
    assert client.ttl(PREFIX + chunks[0].key) == -1  # no expiry by default
    got = tier.get([c.key for c in chunks] + [b"\0" * 16])
    for g, c in zip(got, chunks):
        assert_same_chunk(g, c)
    assert got[3] is None
    assert tier.contains([chunks[0].key, b"\0" * 16]) == [True, False]
    assert tier.delete([c.key for c in chunks[:2]]) == 2
    assert tier.get([chunks[0].key]) == [None]
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.errors) == (3, 2, 0)
    assert stats.bytes_used > 0  # server-reported used_memory
    assert stats.chunks == 1  # keys the servers hold (DBSIZE)


def test_ttl_is_set_on_every_chunk(target, codec):
    chunks = make_chunks(32, 16)
    RedisTier(target.url, codec, ttl_s=300).put(chunks)
    client = target.client()
    assert all(0 < client.ttl(PREFIX + c.key) <= 300 for c in chunks)


def test_flipped_byte_in_redis_is_detected_and_dropped(target, codec):
    chunks = make_chunks(32, 16)
    tier = RedisTier(target.url, codec)
    tier.put(chunks)
    name = PREFIX + chunks[0].key
    client = target.client()
    value = bytearray(client.get(name))
    value[-10] ^= 0x40
    client.set(name, bytes(value))
    got = tier.get([c.key for c in chunks])
    assert got[0] is None
    assert_same_chunk(got[1], chunks[1])
    assert not client.exists(name)
    assert tier.stats().corrupt == 1


@pytest.mark.parametrize("kind", ["server", "cluster"])
def test_server_eviction_reads_as_misses(codec, kind):
    chunks = make_chunks(16 * 40, 16)  # ~40 encoded chunks of ~1.7 KB
    # allkeys-lru; 4 MB per master, of which a cluster node's own state takes 1.8 MB
    with start_target(kind, maxmemory_bytes=4_000_000) as servers:
        tier = RedisTier(servers.url, codec)
        for chunk in chunks:
            tier.put([chunk])
        filler = b"x" * 100_000
        client = Target(servers).client()
        for i in range(150):  # push every master over maxmemory so Redis evicts LRU keys
            client.set(f"filler:{i}", filler)
        got = tier.get([c.key for c in chunks])
        assert any(g is None for g in got), "expected Redis to evict some chunks"
        for g, c in zip(got, chunks):
            if g is not None:
                assert_same_chunk(g, c)
        stats = tier.stats()
        assert stats.evictions > 0 and stats.errors == 0
        masters = len(getattr(servers, "servers", [servers]))
        assert stats.capacity_bytes == 4_000_000 * masters  # maxmemory of every master


def test_killed_servers_cost_misses_not_exceptions_and_recover(target, codec):
    before, after = make_chunks(32, 16), make_chunks(32, 16, seed=1)
    tier = RedisTier(target.url, codec)
    tier.put(before)

    target.kill()
    assert tier.get([c.key for c in before]) == [None, None]
    assert tier.put(after) == [False, False]
    assert tier.contains([before[0].key]) == [False]
    assert tier.delete([before[0].key]) == 0
    down = tier.stats()  # INFO fails too; stats still answers
    assert not down.healthy and down.errors == 4  # one per call, however many masters
    assert "Connection" in down.last_error

    target.start()  # same ports, empty (nothing persisted)
    assert tier.get([c.key for c in before]) == [None, None]
    assert tier.put(after) == [True, True]
    for got, want in zip(tier.get([c.key for c in after]), after):
        assert_same_chunk(got, want)
    assert tier.stats().healthy


def test_keys_scan_only_this_tiers_prefix_and_check_drops_damage(target, codec):
    chunks = make_chunks(40, 16)
    tier = RedisTier(target.url, codec)
    tier.put(chunks)
    client = target.client()
    client.set(PREFIX + b"too-short", b"x")  # same prefix, not a chunk key
    client.set(b"other:data", b"y")
    RedisTier(target.url, codec, key_prefix=b"kv[1]*:").put(make_chunks(16, 16, seed=4))
    assert sorted(tier.keys()) == sorted(c.key for c in chunks)
    name = PREFIX + chunks[1].key
    value = bytearray(client.get(name))
    value[-3] ^= 0x01
    client.set(name, bytes(value))
    checks = tier.check([c.key for c in chunks] + [b"\0" * 16])
    assert [(c.held, bool(c.damage)) for c in checks] == [
        (True, False), (True, True), (True, False), (False, False)]
    assert "checksum mismatch" in checks[1].damage
    assert not client.exists(name)
    stats = tier.stats()
    assert (stats.corrupt, stats.hits, stats.misses) == (1, 0, 0)


def test_keys_of_a_dead_server_end_empty_and_count_the_failure(target, codec):
    tier = RedisTier(target.url, codec)
    tier.put(make_chunks(16, 16))
    target.kill()
    assert list(tier.keys()) == []
    assert tier.check([b"\0" * 16])[0].held is False
    assert tier.stats().errors == 2 and not tier.stats().healthy


# -- what only a cluster has ---------------------------------------------------------

def keys_by_master(cluster: RedisClusterServers) -> list[set[bytes]]:
    """Chunk keys each master holds, asked of each master alone."""
    return [{name[len(PREFIX):] for name in cluster.node_client(i).scan_iter(PREFIX + b"*")}
            for i in range(len(cluster.servers))]


def test_one_prompts_chunks_spread_over_the_masters(cluster, codec):
    chunks = make_chunks(16 * 12, 16)  # one prompt, 12 chunks
    tier = RedisTier(cluster.url, codec)
    assert tier.cluster
    assert tier.put(chunks) == [True] * 12  # SETs to three masters in one call
    held = keys_by_master(cluster)
    assert sum(len(keys) for keys in held) == 12
    assert set().union(*held) == {c.key for c in chunks}
    assert sum(bool(keys) for keys in held) >= 2, "no hash tag may pin a prompt to a master"
    for i, keys in enumerate(held):  # each key where its slot says
        assert all(cluster.master_of(PREFIX + key) == i for key in keys)
    for got, want in zip(tier.get([c.key for c in chunks]), chunks):  # GETs over masters
        assert_same_chunk(got, want)
    assert tier.contains([c.key for c in chunks]) == [True] * 12
    assert sorted(tier.keys()) == sorted(c.key for c in chunks)  # SCAN of every master
    assert tier.delete([c.key for c in chunks]) == 12  # never one DEL across slots
    assert keys_by_master(cluster) == [set(), set(), set()]
    assert tier.stats().errors == 0


def test_stats_sum_every_master(cluster, codec):
    tier = RedisTier(cluster.url, codec)
    tier.put(make_chunks(16 * 12, 16))
    per_master = [(c.info("memory")["used_memory"], c.dbsize())
                  for c in map(cluster.node_client, range(3))]
    stats = tier.stats()
    assert stats.chunks == sum(keys for _, keys in per_master) == 12
    assert stats.chunks > max(keys for _, keys in per_master)
    used = sum(memory for memory, _ in per_master)
    assert abs(stats.bytes_used - used) < 0.05 * used  # used_memory moves a little
    assert stats.bytes_used > 2 * max(memory for memory, _ in per_master)
    assert stats.capacity_bytes == 3 * (64 << 20)

    lost = cluster.master_of(PREFIX + make_chunks(16 * 12, 16)[0].key)
    cluster.kill(lost)
    stats = tier.stats()  # the masters that answer
    assert stats.chunks == sum(keys for i, (_, keys) in enumerate(per_master) if i != lost)
    assert stats.capacity_bytes == 2 * (64 << 20)


def test_a_lost_master_costs_its_chunks_only(cluster, codec):
    """One master killed mid-run: its chunks read as misses (their tokens are recomputed),
    writes to its slots are refused, the other masters serve on; nothing raises. Back
    (empty), it takes writes again."""
    token_ids = list(range(16 * 12))
    chunks = make_chunks(len(token_ids), 16)
    keys = [c.key for c in chunks]
    store = TieredStore([RedisTier(cluster.url, codec)])
    tier = store.tiers[0]
    assert store.put(chunks) == [True] * 12
    on = [cluster.master_of(PREFIX + key) for key in keys]
    lost = on[0]
    cluster.kill(lost)

    expected = [master != lost for master in on]
    loaded = load_entry_kv(store, keys, token_ids, 16, SMALL)
    assert loaded.available.view(12, 16).all(dim=1).tolist() == expected
    assert loaded.available.view(12, 16).any(dim=1).tolist() == expected
    for index, chunk in enumerate(chunks):
        if expected[index]:
            assert torch.equal(loaded.kv[:, :, 16 * index:16 * (index + 1)], chunk.kv)
    assert tier.contains(keys) == expected
    later = make_chunks(16 * 12, 16, seed=7)
    assert tier.put(later) == [cluster.master_of(PREFIX + c.key) != lost for c in later]
    stats = tier.stats()
    assert stats.errors == 3 and not stats.healthy  # get, contains, put: one each
    assert stats.hits == sum(expected)

    cluster.start()  # the lost master rejoins, empty
    assert tier.contains(keys) == expected
    assert tier.put(chunks) == [True] * 12
    assert tier.contains(keys) == [True] * 12
    assert tier.stats().healthy


def test_the_tier_starts_while_the_cluster_is_down(codec):
    """The cluster client is built at first use: a tier built (vLLM started) before its
    cluster costs misses until the cluster is up, then works."""
    servers = RedisClusterServers(masters=3)
    try:
        tier = RedisTier(servers.url, codec)
        chunks = make_chunks(32, 16)
        assert tier.put(chunks) == [False, False]
        assert tier.get([c.key for c in chunks]) == [None, None]
        assert tier.stats().chunks == -1  # no master has answered yet
        servers.start()
        assert tier.put(chunks) == [True, True]
        for got, want in zip(tier.get([c.key for c in chunks]), chunks):
            assert_same_chunk(got, want)
    finally:
        servers.close()


@pytest.mark.parametrize(("url", "fragment"), [
    ("redis+cluster://10.0.0.1", "node '10.0.0.1' is not HOST:PORT"),
    ("redis+cluster://10.0.0.1:7000,:7001", "node ':7001' is not HOST:PORT"),
    ("redis+cluster://10.0.0.1:7000/1", "one database"),
    ("redis+cluster://u:secret@10.0.0.1:x", "<hidden>@10.0.0.1:x"),
    ("rediscluster://10.0.0.1:7000", "redis+cluster://HOST:PORT"),
])
def test_bad_cluster_urls_are_named(url, fragment):
    with pytest.raises(ConfigError, match="redis_url") as excinfo:
        KVShareConfig(redis_url=url)
    assert fragment in str(excinfo.value) and "secret" not in str(excinfo.value)


def test_cluster_url_takes_several_startup_nodes_and_credentials():
    url = "redis+cluster://kv:p%40ss@10.0.0.1:7000,10.0.0.2:7001"
    assert KVShareConfig(redis_url=url).redis_url == url
    parsed = parse_cluster_url(url)
    assert parsed.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (parsed.username, parsed.password) == ("kv", "p@ss")
