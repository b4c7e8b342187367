"""Redis tier against a real redis-server: round trip, TTL, damage, and a server crash."""

import pytest
import redis
from kv_samples import assert_same_chunk, make_chunks

from kvshare.storage.redis_tier import RedisTier


def raw_client(server):
    return redis.Redis.from_url(server.url)


@pytest.mark.parametrize("pipeline_bytes", [1, 4 << 20], ids=["pipeline-per-chunk", "one-pipeline"])
def test_round_trip_one_key_per_chunk(redis_server, codec, pipeline_bytes):
    chunks = make_chunks(40, 16)
    tier = RedisTier(redis_server.url, codec, pipeline_bytes=pipeline_bytes)
    assert tier.put(chunks) == [True] * 3
    client = raw_client(redis_server)
    assert sorted(client.keys("*")) == sorted(b"kvshare:chunk:" + c.key for c in chunks)
    assert client.ttl(b"kvshare:chunk:" + chunks[0].key) == -1  # no expiry by default
    got = tier.get([c.key for c in chunks] + [b"\0" * 16])
    for g, c in zip(got, chunks):
        assert_same_chunk(g, c)
    assert got[3] is None
    assert tier.contains([chunks[0].key, b"\0" * 16]) == [True, False]
    assert tier.delete([chunks[0].key]) == 1
    assert tier.get([chunks[0].key]) == [None]
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.errors) == (3, 2, 0)
    assert stats.bytes_used > 0  # server-reported used_memory


def test_ttl_is_set_on_every_chunk(redis_server, codec):
    chunks = make_chunks(32, 16)
    RedisTier(redis_server.url, codec, ttl_s=300).put(chunks)
    client = raw_client(redis_server)
    assert all(0 < client.ttl(b"kvshare:chunk:" + c.key) <= 300 for c in chunks)


def test_flipped_byte_in_redis_is_detected_and_dropped(redis_server, codec):
    chunks = make_chunks(32, 16)
    tier = RedisTier(redis_server.url, codec)
    tier.put(chunks)
    name = b"kvshare:chunk:" + chunks[0].key
    client = raw_client(redis_server)
    value = bytearray(client.get(name))
    value[-10] ^= 0x40
    client.set(name, bytes(value))
    got = tier.get([c.key for c in chunks])
    assert got[0] is None
    assert_same_chunk(got[1], chunks[1])
    assert not client.exists(name)
    assert tier.stats().corrupt == 1


def test_server_eviction_reads_as_misses(codec):
    from kvshare.storage.redis_server import RedisServer

    chunks = make_chunks(16 * 40, 16)  # ~40 encoded chunks of ~1.7 KB
    with RedisServer(maxmemory_bytes=2_000_000) as server:  # allkeys-lru
        tier = RedisTier(server.url, codec)
        for chunk in chunks:
            tier.put([chunk])
        filler = b"x" * 100_000
        client = raw_client(server)
        for i in range(20):  # push memory over maxmemory so Redis evicts LRU keys
            client.set(f"filler:{i}", filler)
        got = tier.get([c.key for c in chunks])
        assert any(g is None for g in got), "expected Redis to evict some chunks"
        for g, c in zip(got, chunks):
            if g is not None:
                assert_same_chunk(g, c)
        assert tier.stats().evictions > 0 and tier.stats().errors == 0


def test_killed_server_costs_misses_not_exceptions_and_recovers(redis_server, codec):
    before, after = make_chunks(32, 16), make_chunks(32, 16, seed=1)
    tier = RedisTier(redis_server.url, codec)
    tier.put(before)

    redis_server.kill()
    assert tier.get([c.key for c in before]) == [None, None]
    assert tier.put(after) == [False, False]
    assert tier.contains([before[0].key]) == [False]
    assert tier.delete([before[0].key]) == 0
    down = tier.stats()  # INFO fails too; stats still answers
    assert not down.healthy and down.errors == 4
    assert "Connection" in down.last_error

    redis_server.start()  # same port, empty (nothing persisted)
    assert tier.get([c.key for c in before]) == [None, None]
    assert tier.put(after) == [True, True]
    for got, want in zip(tier.get([c.key for c in after]), after):
        assert_same_chunk(got, want)
    assert tier.stats().healthy


def test_keys_scan_only_this_tiers_prefix_and_check_drops_damage(redis_server, codec):
    chunks = make_chunks(40, 16)
    tier = RedisTier(redis_server.url, codec)
    tier.put(chunks)
    client = raw_client(redis_server)
    client.set(b"kvshare:chunk:too-short", b"x")  # same prefix, not a chunk key
    client.set(b"other:data", b"y")
    RedisTier(redis_server.url, codec, key_prefix=b"kv[1]*:").put(make_chunks(16, 16, seed=4))
    assert sorted(tier.keys()) == sorted(c.key for c in chunks)
    name = b"kvshare:chunk:" + chunks[1].key
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


def test_keys_of_a_dead_server_end_empty_and_count_the_failure(redis_server, codec):
    tier = RedisTier(redis_server.url, codec)
    tier.put(make_chunks(16, 16))
    redis_server.kill()
    assert list(tier.keys()) == []
    assert tier.check([b"\0" * 16])[0].held is False
    assert tier.stats().errors == 2 and not tier.stats().healthy
