"""Real vLLM CPU engines with the connector, shared by the whole session.

An engine start costs about a minute on two cores, so the suite starts at most two:
prefix caching on (the default setup) and off with ``strict_prefix_cache``. Each test
works in its own tenant (``cache_salt``), so tests never see each other's entries, and
a fresh tenant doubles as "vanilla vLLM" (nothing to reuse, no prefix-cache hit).

vLLM lays out its CPU KV cache by the attention ISA it picks for the host: ``amx`` where
the CPU has AMX tiles, ``vec`` on other x86 hosts. The strict engine keeps the host's
pick; the in-process engine always runs ``vec`` (vLLM's pick is replaced while it
starts), so on an AMX host the suite runs both layouts through real engines, and on
other hosts ``vec`` twice (``amx`` then only through vLLM's op and the AMX-host fixtures
in ``test_paged_kv.py``).

The strict engine runs as users run vLLM, its EngineCore in a child process. The
prefix-caching engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, started
second so that no child is forked from a process holding an engine): its connector halves
are the same code, and tests can look at their state (no request state left behind,
index entries, the save queue) and step the engine request by request. Its KV cache is
small (``KV_CACHE_BLOCKS``), so long requests preempt each other.

Both engines use ``max_num_batched_tokens = BUDGET``. With the tail computed by vLLM,
a prompt of ``SPLIT`` tokens is claimed up to position ``BUDGET`` and vLLM prefills the
rest, the same split as vanilla vLLM's chunked prefill of that prompt, so greedy outputs
can be compared exactly. The only tier is a disk directory, so tests can delete and
corrupt chunks from outside the worker.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
from engines import BUDGET, KV_CACHE_BLOCKS, Engine


@contextmanager
def attention_isa(isa: str):
    """vLLM picks ``isa`` for the CPU attention (and its KV layout) of the engines started
    in this process meanwhile, whatever the host supports."""
    from vllm.v1.attention.backends import cpu_attn

    picked = cpu_attn._get_attn_isa
    cpu_attn._get_attn_isa = lambda *args, **kwargs: isa
    try:
        yield
    finally:
        cpu_attn._get_attn_isa = picked


def _start(tmp_path_factory, name: str, *, prefix_caching: bool, in_process: bool = False,
           kv_cache_blocks: int | None = None, isa: str | None = None, **extra) -> Engine:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from kvshare.model_assets import resolve_model_dir
    from kvshare.model_identity import model_fingerprint

    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    home = tmp_path_factory.mktemp(name)
    model = str(resolve_model_dir("smollm2-135m-instruct"))
    extra_config = {"home": str(home), "cpu_bytes": 0, "disk_dir": str(home / "chunks"),
                    "share_public_scope": False, **extra}
    sizing = {}
    if kv_cache_blocks is not None:
        sizing["kv_cache_memory_bytes"] = kv_cache_blocks * 128 * _bytes_per_token(model)
    with attention_isa(isa) if isa is not None else nullcontext():
        llm = LLM(
            model=model, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=2048,
            max_num_batched_tokens=BUDGET, enable_prefix_caching=prefix_caching, seed=0,
            kv_transfer_config=KVTransferConfig(
                kv_connector="KVShareConnector", kv_connector_module_path="kvshare.connector",
                kv_role="kv_both", kv_load_failure_policy="recompute",
                kv_connector_extra_config=extra_config),
            **sizing,
        )
    return Engine(llm=llm, home=home, chunk_dir=home / "chunks",
                  model_id=model_fingerprint(model, home))


def _bytes_per_token(model_dir: str) -> int:
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 2


@pytest.fixture(scope="session")
def strict_engine(tmp_path_factory) -> Engine:
    """Connector with prefix caching off and ``strict_prefix_cache``, as users run vLLM."""
    return _start(tmp_path_factory, "kvshare-strict", prefix_caching=False,
                  strict_prefix_cache=True)


@pytest.fixture(scope="session")
def engine(tmp_path_factory, strict_engine) -> Engine:
    """Connector with vLLM prefix caching on (vLLM's default), in this process, with a
    small KV cache, in the ``vec`` layout. Started after ``strict_engine`` (see the module
    docstring)."""
    return _start(tmp_path_factory, "kvshare-prefix-on", prefix_caching=True, in_process=True,
                  kv_cache_blocks=KV_CACHE_BLOCKS, isa="vec")


@pytest.fixture(scope="session")
def report_tokens(tokenizer) -> list[int]:
    """About 1.4k tokens of report-like text: numbers, names and repeated structure."""
    text = "You are a careful analyst. Read the data below and answer the question.\n" + " ".join(
        f"Item {i}: the quarterly report for branch {i % 7} shows revenue of {1000 + 37 * i} "
        f"dollars, costs of {400 + 11 * i} dollars and {i % 5} new hires."
        for i in range(40)
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]
