"""The config decides which tiers exist, in which order, with which caps."""

import pytest
import redis
import torch
from kv_samples import assert_same_chunk, make_chunks

from kvshare.config import ConfigError, KVShareConfig
from kvshare.tiers_setup import build_store


def test_default_like_config_builds_cpu_disk_redis_in_order(tmp_path, redis_server):
    config = KVShareConfig(home=str(tmp_path), cpu_bytes=1 << 20, disk_bytes=1 << 21,
                           redis_url=redis_server.url, redis_ttl_s=60, compression="zstd")
    store = build_store(config)
    assert [t.name for t in store.tiers] == ["cpu", "disk", "redis"]
    cpu, disk, redis_tier = store.tiers
    assert cpu.stats().capacity_bytes == 1 << 20
    assert disk.root == tmp_path / "chunks" and disk.stats().capacity_bytes == 1 << 21
    assert redis_tier.ttl_s == 60
    assert (disk.codec.compression, redis_tier.codec.compression) == ("zstd-byteplane", "raw")
    store.close()


@pytest.mark.parametrize(("disk_codec", "redis_codec", "expected"), [
    ("", "", ("zstd", "zstd")),  # empty: the config's compression
    ("zstd-byteplane", "raw", ("zstd-byteplane", "raw")),
    ("raw", "zstd-byteplane", ("raw", "zstd-byteplane")),
])
def test_each_tier_gets_its_own_codec(tmp_path, redis_server, disk_codec, redis_codec,
                                      expected):
    config = KVShareConfig(home=str(tmp_path), cpu_bytes=0, redis_url=redis_server.url,
                           compression="zstd", disk_compression=disk_codec,
                           redis_compression=redis_codec,
                           zstd_level=3, codec_threads=1)
    store = build_store(config)
    disk_tier, redis_tier = store.tiers
    assert (disk_tier.codec.compression, redis_tier.codec.compression) == expected
    assert disk_tier.codec.level == redis_tier.codec.level == 3
    assert disk_tier.codec.threads == redis_tier.codec.threads == 1
    # What each tier writes is encoded with its own codec, and reads back.
    chunks = make_chunks(40, 16)
    assert store.put(chunks) == [True] * 3
    stored_codecs = (
        codec_of((tmp_path / "chunks" / f"{chunks[0].key.hex()}.kvc").read_bytes()),
        codec_of(redis.Redis.from_url(redis_server.url).get(
            redis_tier.key_prefix + chunks[0].key)))
    assert stored_codecs == expected
    for tier in store.tiers:
        for got, want in zip(tier.get([c.key for c in chunks]), chunks):
            assert_same_chunk(got, want)
    store.close()


def codec_of(encoded: bytes) -> str:
    """The codec a stored chunk names in its header (the byte after magic and version)."""
    return {0: "raw", 1: "zstd", 2: "zstd-byteplane"}[encoded[6]]


def test_the_shipped_defaults_compress_disk_chunks_and_store_redis_chunks_raw():
    config = KVShareConfig()
    assert (config.compression, config.disk_compression, config.redis_compression) == (
        "zstd-byteplane", "zstd-byteplane", "raw")
    with pytest.raises(ConfigError, match="disk_compression='lz4'"):
        KVShareConfig(disk_compression="lz4")


def test_disabled_tiers_are_left_out(tmp_path):
    config = KVShareConfig(home=str(tmp_path), cpu_bytes=0, disk_dir="none")
    assert build_store(config).tiers == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-host fallback")
def test_gpu_tier_is_skipped_without_cuda(tmp_path, caplog):
    config = KVShareConfig(home=str(tmp_path), gpu_bytes=1 << 20, disk_dir="none")
    assert [t.name for t in build_store(config).tiers] == ["cpu"]
    assert "CUDA is not available" in caplog.text


def test_storage_config_values_are_checked():
    with pytest.raises(ConfigError, match="zstd_level=0"):
        KVShareConfig(zstd_level=0)
    with pytest.raises(ConfigError, match="codec_threads=0"):
        KVShareConfig(codec_threads=0)
    with pytest.raises(ConfigError, match="gpu_bytes=-1"):
        KVShareConfig(gpu_bytes=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tier_comes_first_where_cuda_is_present(tmp_path):
    config = KVShareConfig(home=str(tmp_path), gpu_bytes=1 << 20, disk_dir="none")
    store = build_store(config)
    assert [t.name for t in store.tiers] == ["gpu", "cpu"]
    assert store.tiers[0].device.type == "cuda" and store.tiers[1].pin_memory


def test_an_inspecting_process_opens_no_memory_tier_and_never_shrinks_the_disk(tmp_path):
    serving = KVShareConfig(home=str(tmp_path), cpu_bytes=1 << 20, disk_bytes=1 << 22)
    store = build_store(serving)
    chunks = make_chunks(16 * 4, 16)
    store.put(chunks)
    on_disk = store.tiers[1].stats().bytes_used
    store.close()
    smaller = KVShareConfig(home=str(tmp_path), cpu_bytes=1 << 20, disk_bytes=on_disk // 2)
    inspecting = build_store(smaller, serving=False)
    assert [t.name for t in inspecting.tiers] == ["disk"]
    assert inspecting.tiers[0].stats().bytes_used == on_disk > smaller.disk_bytes
    assert all(inspecting.contains([c.key for c in chunks]))
    # A serving process with that config does evict down to its cap.
    assert build_store(smaller).tiers[1].stats().bytes_used <= smaller.disk_bytes
