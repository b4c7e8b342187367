"""A real vLLM engine whose only tier is a real 3-master Redis Cluster.

One prompt is stored, its chunks spread over the masters; a similar prompt then reuses
them, read back from the cluster by the worker (the masters count the GETs).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest
from engines import spawn_engines_in_children

from kvshare.model_assets import resolve_model_dir
from kvshare.model_identity import model_fingerprint
from kvshare.storage.keys import chunk_keys
from kvshare.storage.redis_server import RedisClusterServers

PREFIX = b"kvshare:chunk:"
CHUNK_TOKENS = 256
KV_CACHE_BYTES = 64 * 128 * 23_040
"""64 blocks of 128 tokens of SmolLM2-135M's KV (23,040 B/token): plenty for one request at
a time, and a fixed size instead of a share of host memory (which vLLM checks is free)."""


@pytest.fixture(scope="module")
def cluster():
    with RedisClusterServers(masters=3, maxmemory_bytes=256 << 20) as servers:
        yield servers


@dataclass
class ClusterEngine:
    llm: object
    model_id: str
    """The model's fingerprint, part of every chunk key."""


@pytest.fixture(scope="module")
def cluster_engine(tmp_path_factory, cluster) -> ClusterEngine:
    """One vLLM engine (EngineCore in a spawned child, as users run it) with kvshare's
    connector and no tier but the cluster: no CPU tier, no disk, no shadow checks."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    spawn_engines_in_children()
    home = tmp_path_factory.mktemp("kvshare-redis-cluster")
    extra = {"home": str(home), "cpu_bytes": 0, "disk_dir": "none",
             "redis_url": cluster.url, "chunk_tokens": CHUNK_TOKENS,
             "share_public_scope": False, "shadow_sample_rate": 0.0}
    model_dir = resolve_model_dir("smollm2-135m-instruct")
    llm = LLM(model=str(model_dir), enforce_eager=True,
              kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=2048,
              max_num_batched_tokens=2048, seed=0, kv_transfer_config=KVTransferConfig(
                  kv_connector="KVShareConnector", kv_connector_module_path="kvshare.connector",
                  kv_role="kv_both", kv_load_failure_policy="recompute",
                  kv_connector_extra_config=extra))
    yield ClusterEngine(llm, model_fingerprint(model_dir, home))
    llm.llm_engine.engine_core.shutdown()


def run(llm, token_ids: list[int], tenant: str):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": token_ids, "cache_salt": tenant}], params,
                        use_tqdm=False)[0]


def chunk_keys_by_master(cluster: RedisClusterServers) -> list[set[bytes]]:
    return [set(cluster.node_client(i).scan_iter(PREFIX + b"*"))
            for i in range(len(cluster.servers))]


def wait_until_stored(cluster: RedisClusterServers, names: list[bytes],
                      timeout_s: float = 120.0) -> None:
    """Poll the masters until they hold every key in ``names``: the worker writes a
    prompt's chunks behind the request, after ``generate`` has returned."""
    deadline = time.monotonic() + timeout_s
    while not all(cluster.node_client(cluster.master_of(name)).exists(name)
                  for name in names):
        assert time.monotonic() < deadline, "the prompt's chunks never reached the cluster"
        time.sleep(0.05)


def gets_by_master(cluster: RedisClusterServers) -> list[int]:
    """GET commands each master has answered so far."""
    return [cluster.node_client(i).info("commandstats").get("cmdstat_get", {}).get("calls", 0)
            for i in range(len(cluster.servers))]


@pytest.mark.engine
def test_a_similar_prompt_reuses_chunks_read_from_the_cluster(cluster_engine, cluster,
                                                              report_tokens):
    stored = report_tokens[:1024]
    first = run(cluster_engine.llm, stored, "cluster")
    assert first.kv_transfer_params is None  # nothing to reuse yet
    names = [PREFIX + key for key in chunk_keys(cluster_engine.model_id, stored, CHUNK_TOKENS,
                                                scope="cluster")]
    wait_until_stored(cluster, names)
    held = chunk_keys_by_master(cluster)
    assert set().union(*held) == set(names)  # the cluster is the only tier
    assert sum(bool(keys) for keys in held) >= 2, "one prompt's chunks on one master"
    for i, keys in enumerate(held):
        assert all(cluster.master_of(name) == i for name in keys)
    # A request that is not stored (shorter than min_store_tokens) lets the engine step
    # until the worker has reported the save: from then on the chunks come from the
    # tiers, no longer from the worker's save queue.
    run(cluster_engine.llm, report_tokens[:8], "barrier")

    similar = stored[:600] + report_tokens[1100:1104] + stored[604:]  # 4 tokens edited
    gets_before = gets_by_master(cluster)
    second = run(cluster_engine.llm, similar, "cluster")
    report = second.kv_transfer_params["kvshare"]
    assert report["loaded"] > 0 and report["reused"] > 0 and not report["fallback"]
    gets = [after - before for after, before in zip(gets_by_master(cluster), gets_before)]
    # Every loaded token came from a chunk the worker read from the cluster.
    assert sum(gets) >= math.ceil(report["loaded"] / CHUNK_TOKENS)
