"""The plugin caps oneDNN's primitive cache in workers that run kvshare's connector."""

from __future__ import annotations

from dataclasses import dataclass

from kvshare.plugin import ONEDNN_CACHE_CAPACITY, bound_gemm_kernel_cache


@dataclass
class Transfer:
    kv_connector: str


@dataclass
class Config:
    kv_transfer_config: Transfer | None


def test_a_kvshare_worker_gets_the_cap():
    environ: dict[str, str] = {}
    assert bound_gemm_kernel_cache(Config(Transfer("KVShareConnector")), environ)
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(ONEDNN_CACHE_CAPACITY)}


def test_other_workers_and_a_users_own_capacity_are_left_alone():
    for config in (Config(None), Config(Transfer("LMCacheConnectorV1"))):
        environ: dict[str, str] = {}
        assert not bound_gemm_kernel_cache(config, environ) and environ == {}
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        environ = {name: "512"}
        assert not bound_gemm_kernel_cache(Config(Transfer("KVShareConnector")), environ)
        assert environ == {name: "512"}
