"""Connector start-up checks that need no engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvshare.config import ConfigError, KVShareConfig
from kvshare.connector.connector import check_vllm_config


def vllm_config(prefix_caching: bool, tp: int = 1, cache_dtype: str = "auto"):
    return SimpleNamespace(
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching,
                                     cache_dtype=cache_dtype),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1),
        kv_transfer_config=SimpleNamespace(kv_load_failure_policy="recompute"),
    )


def test_strict_prefix_cache_requires_prefix_caching_off():
    strict = KVShareConfig(strict_prefix_cache=True)
    with pytest.raises(ConfigError, match="--no-enable-prefix-caching"):
        check_vllm_config(strict, vllm_config(prefix_caching=True))
    check_vllm_config(strict, vllm_config(prefix_caching=False))
    check_vllm_config(KVShareConfig(), vllm_config(prefix_caching=True))


def test_tensor_parallel_is_refused_with_its_value():
    with pytest.raises(ConfigError, match="got 2"):
        check_vllm_config(KVShareConfig(), vllm_config(prefix_caching=False, tp=2))


def test_a_quantized_kv_cache_is_refused_with_its_dtype():
    with pytest.raises(ConfigError, match="kv_cache_dtype='fp8'.*--kv-cache-dtype auto"):
        check_vllm_config(KVShareConfig(), vllm_config(prefix_caching=True, cache_dtype="fp8"))
