"""The config decides which tiers exist, in which order, with which caps."""

import pytest
import torch

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
    assert disk.codec is redis_tier.codec and disk.codec.compression == "zstd"
    store.close()


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
