"""The connector test engines: sizes shared by the tests, and a handle on one engine.

See ``conftest.py`` for how the engines start.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from kvshare.config import KVShareConfig

BUDGET = 256
"""``max_num_batched_tokens`` of the test engines (tokens per step)."""
TAIL = KVShareConfig().recompute_tail_tokens
SPLIT = BUDGET + TAIL + 1
"""Prompt length whose claim (without a prefix hit) ends at ``BUDGET``, where vanilla
vLLM's chunked prefill splits it too."""
KV_CACHE_BLOCKS = 20
"""Blocks of 128 tokens in the in-process engine's KV cache: more than one 2,048-token
request needs, few enough that two long requests preempt each other."""

STUCK_S = 300.0
"""A stepped engine that has not got there after this long is stuck (steps waiting for a
lookup are empty and fast, so the bound is time, not steps)."""


def step_until_done(llm_engine, on_step=None) -> dict:
    """Step until every request finished (calling ``on_step`` after each step); their final
    outputs by request id. A stuck engine fails the test."""
    finished = {}
    deadline = time.monotonic() + STUCK_S
    while llm_engine.has_unfinished_requests():
        assert time.monotonic() < deadline, f"requests still running after {STUCK_S:.0f} s"
        finished.update((out.request_id, out) for out in llm_engine.step() if out.finished)
        if on_step is not None:
            on_step()
    return finished


def spawn_engines_in_children() -> None:
    """Make the next ``LLM(...)`` run its EngineCore in a spawned child process.

    The session's in-process ``engine`` freezes vLLM's environment reads at its start-up
    (``vllm.envs.enable_envs_cache``), so setting ``VLLM_ENABLE_V1_MULTIPROCESSING`` alone
    would start the next engine in this process too, and shutting that one down tears
    down this process's distributed state under the in-process engine."""
    from vllm import envs

    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"  # safe beside in-process engines
    envs.disable_envs_cache()


@dataclass
class Engine:
    llm: object
    home: Path
    chunk_dir: Path
    model_id: str
    budget: int = BUDGET

    def run(self, token_ids: list[int], tenant: str, *, rho: float | None = None,
            max_tokens: int = 8, **params):
        """Greedy completion of ``token_ids`` in ``tenant``; one RequestOutput."""
        return self.run_many([token_ids], tenant, rho=rho, max_tokens=max_tokens, **params)[0]

    def run_many(self, prompts: list[list[int]], tenant: str, *, rho: float | None = None,
                 max_tokens: int = 8, **params):
        """Greedy completions of several prompts submitted together (one batch)."""
        from vllm import SamplingParams

        extra_args = {**params.pop("extra_args", {}),
                      **({"kvshare_rho": rho} if rho is not None else {})}
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                ignore_eos=params.pop("ignore_eos", True),
                                extra_args=extra_args or None, **params)
        batch = [{"prompt_token_ids": list(ids), "cache_salt": tenant} for ids in prompts]
        return self.llm.generate(batch, params, use_tqdm=False)

    @property
    def engine_core(self):
        """The EngineCore (in-process engines only)."""
        return self.llm.llm_engine.engine_core.engine_core

    @property
    def scheduler(self):
        """The connector's scheduler half (claims, index)."""
        return self.engine_core.scheduler.connector._scheduler

    @property
    def worker(self):
        """The connector's worker half (tiers, loads, saves)."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        return get_kv_transfer_group()._worker

    def settle(self) -> None:
        """Finish every save in flight and commit its entry: a request finished before its
        save was answered keeps the engine stepping until it is."""
        scheduler = self.engine_core.scheduler
        while scheduler.has_requests():
            self.engine_core.step()
        self.scheduler.wait_for_catalog()
        assert not self.scheduler._saving, "a save was not answered"

    def entries(self, tenant: str) -> list:
        """Index entries of ``tenant``, oldest first, once the catalog calls queued so far
        (commits, drops) have run."""
        self.scheduler.wait_for_catalog()
        return sorted((e for e in self.scheduler.catalog.index.entries() if e.scope == tenant),
                      key=lambda e: e.created_at)
