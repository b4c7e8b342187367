"""Run a list of requests through one vLLM CPU engine, in a child process.

The quality and TTFT benchmarks start one engine per system (vanilla, kvshare, naive,
CacheBlend-style...). Each engine lives in its own ``python -m kvshare.bench.vllm_runner``
child so that its memory, its EngineCore/worker processes and any module state (the
connector's plugin hook) are gone before the next engine starts; two engines at once
do not fit comfortably beside other work on a small CPU machine.

Requests run one at a time (nothing else in the batch), so a request's numerics and its
time to first token do not depend on its neighbours. A request may name a *filler*: a
throw-away prompt queued just before it, sized so that vLLM's token budget
(``max_num_batched_tokens``) leaves room for exactly ``len(prompt) - 1`` of the request's
tokens in one step (see :func:`kvshare.bench.quality.split_filler`); the last prompt
token is then prefilled alone in the next step. That is the
``split`` prefill kvshare's connector produces (it fills ``N - 1`` tokens, vLLM computes
the last), obtained from vanilla vLLM.

Protocol: the parent writes a JSON job (``EngineSpec`` + ``Req`` list), the child writes
a JSON list of ``Result``; both are plain dataclasses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONNECTOR_NAME = "KVShareConnector"
CONNECTOR_MODULE = "kvshare.connector"
RHO_ARG = "kvshare_rho"
"""``SamplingParams.extra_args`` key the connector reads as a per-request rho."""


class EngineUnavailable(RuntimeError):
    """The engine (usually: the kvshare connector) could not start or serve requests."""


@dataclass
class EngineSpec:
    """How to start one vLLM engine."""

    name: str
    model_dir: str
    max_model_len: int = 4096
    max_num_batched_tokens: int = 4096
    enable_prefix_caching: bool = True
    connector: dict[str, Any] | None = None
    """``kv_connector_extra_config`` for KVShareConnector; None = vanilla vLLM."""
    kv_cache_bytes: int = 1 << 30
    seed: int = 0


@dataclass
class Req:
    """One request; it runs alone (plus its filler, if any)."""

    req_id: str
    token_ids: list[int]
    max_tokens: int = 64
    salt: str | None = None
    """vLLM ``cache_salt``: prefix-cache namespace and kvshare tenant."""
    rho: float | None = None
    """Per-request kvshare rho (connector engines only)."""
    filler_ids: list[int] | None = None
    """Prompt submitted first in the same step to force an (N-1, 1) prefill split."""


@dataclass
class Result:
    req_id: str
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float = 0.0
    """Wall time from submission to the first generated token."""
    e2e_s: float = 0.0
    first_logprob: float | None = None
    """Log-probability of the first generated token: shows numeric drift that greedy
    decoding hides (same token, slightly different logits)."""
    num_cached_tokens: int = 0
    """Prompt tokens vLLM did not compute itself: its prefix-cache hit plus connector claims."""
    kvshare: dict[str, Any] | None = None
    """The connector's load report (``kv_transfer_params["kvshare"]``): claimed, loaded,
    recomputed, fallback, seconds, load_seconds, sources; None when nothing was claimed."""


def warmup_requests(token_ids: list[int], count: int = 2) -> list[Req]:
    """Short requests, each in its own scope so nothing reuses them, that absorb an
    engine's first-call costs before timed requests run."""
    return [Req(f"warmup/{i}", list(token_ids[:256]), 1, salt=f"warmup/{i}")
            for i in range(count)]


def vllm_env() -> dict[str, str]:
    """Environment for every engine: one reserved core with or without a connector, so
    vanilla and connector engines compute with the same thread count."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_engine(spec: EngineSpec, requests: list[Req], timeout_s: float = 3600.0,
               progress: bool = True) -> list[Result]:
    """Start ``spec`` in a child process, run ``requests`` in order, return their results.

    Raises :class:`EngineUnavailable` with the child's last error lines when the engine
    cannot start or a request fails.
    """
    with tempfile.TemporaryDirectory(prefix=f"kvshare-{spec.name}-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"spec": asdict(spec), "requests": [asdict(r) for r in requests],
                                   "progress": progress}))
        log = Path(tmp) / "stderr.log"
        with log.open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "kvshare.bench.vllm_runner",
                                     str(job), str(out)], env=vllm_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            tail = _tee_progress(proc, stderr, progress)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise EngineUnavailable(
                    f"engine {spec.name!r} exceeded {timeout_s:.0f} s") from None
        if rc != 0 or not out.is_file():
            raise EngineUnavailable(f"engine {spec.name!r} exited with {rc}: " + _error_of(tail))
        return [Result(**item) for item in json.loads(out.read_text())]


def _tee_progress(proc: subprocess.Popen, log, progress: bool) -> list[str]:
    """Copy the child's output to ``log``; show its progress lines; keep the tail."""
    tail: list[str] = []
    for line in proc.stdout:
        log.write(line)
        tail = (tail + [line.rstrip()])[-60:]
        if progress and line.startswith("[kvshare-bench]"):
            print(line[len("[kvshare-bench] "):], end="", file=sys.stderr, flush=True)
    return tail


def _error_of(lines: list[str]) -> str:
    """The most telling line of a child's stderr: the last exception, else the last line."""
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line.strip()
    return lines[-1].strip() if lines else "(no output)"


# ---------------------------------------------------------------------- child side
def _make_llm(spec: EngineSpec):
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=spec.model_dir, max_model_len=spec.max_model_len,
        max_num_batched_tokens=spec.max_num_batched_tokens, enable_chunked_prefill=True,
        enable_prefix_caching=spec.enable_prefix_caching, enforce_eager=True,
        gpu_memory_utilization=0.3, kv_cache_memory_bytes=spec.kv_cache_bytes,
        max_num_seqs=4, seed=spec.seed, dtype="bfloat16",
    )
    if spec.connector is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_connector_module_path=CONNECTOR_MODULE,
            kv_role="kv_both", kv_connector_extra_config=dict(spec.connector))
    return LLM(**kwargs)


def _serve(llm, req: Req) -> Result:
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, logprobs=0,
                            extra_args={RHO_ARG: req.rho} if req.rho is not None else None)
    prompt: dict[str, Any] = {"prompt_token_ids": list(req.token_ids)}
    if req.salt:
        prompt["cache_salt"] = req.salt
    filler_id = None
    if req.filler_ids:
        filler = {"prompt_token_ids": list(req.filler_ids), "cache_salt": f"{req.req_id}/filler"}
        filler_id = f"{req.req_id}/filler"
        engine.add_request(filler_id, filler, SamplingParams(max_tokens=1, temperature=0.0))
    started = time.perf_counter()
    engine.add_request(req.req_id, prompt, params)
    result = Result(req.req_id)
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id != req.req_id:
                continue
            if not result.ttft_s and output.outputs and output.outputs[0].token_ids:
                result.ttft_s = time.perf_counter() - started
            if output.finished:
                final = output
    result.e2e_s = time.perf_counter() - started
    if final is None:
        raise RuntimeError(f"request {req.req_id} produced no final output")
    result.output_ids = list(final.outputs[0].token_ids)
    result.text = final.outputs[0].text
    logprobs = final.outputs[0].logprobs
    if logprobs and result.output_ids:
        first = logprobs[0].get(result.output_ids[0])
        result.first_logprob = None if first is None else float(first.logprob)
    result.num_cached_tokens = int(final.num_cached_tokens or 0)
    params_out = final.kv_transfer_params or {}
    result.kvshare = params_out.get("kvshare") if isinstance(params_out, dict) else None
    return result


def _child(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    spec = EngineSpec(**job["spec"])
    requests = [Req(**r) for r in job["requests"]]
    started = time.perf_counter()
    llm = _make_llm(spec)
    _say(f"{spec.name}: engine up in {time.perf_counter() - started:.0f} s, "
         f"{len(requests)} requests")
    results = []
    step = max(1, len(requests) // 10)
    for i, req in enumerate(requests):
        results.append(asdict(_serve(llm, req)))
        if (i + 1) % step == 0 or i + 1 == len(requests):
            done = (i + 1) / len(requests)
            bar = "#" * int(20 * done)
            _say(f"{spec.name}: [{bar:<20}] {i + 1}/{len(requests)} "
                 f"({time.perf_counter() - started:.0f} s)")
    Path(out_path).write_text(json.dumps(results))
    return 0


def _say(message: str) -> None:
    print(f"[kvshare-bench] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(_child(*sys.argv[1:3]))
