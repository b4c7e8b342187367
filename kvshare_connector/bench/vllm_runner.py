"""Run a list of requests through one vLLM CPU engine, in a child process.

The quality and TTFT benchmarks start one engine per system (vanilla, kvshare, naive,
CacheBlend-style...). Each engine lives in its own ``python -m kvshare.bench.vllm_runner``
child so that its memory, its EngineCore/worker processes and any module state (the
connector's plugin hook) are gone before the next engine starts; two engines at once
do not fit comfortably beside other work on a small CPU machine.

Requests run one at a time (nothing else in the batch), so a request's numerics and its
time to first token do not depend on its neighbours. A request may name a *filler*: a
throw-away prompt queued just before it, sized so that vLLM's token budget
(``max_num_batched_tokens``) leaves room for exactly the first ``h`` of the request's
tokens in one step (see :func:`kvshare.bench.quality.split_filler`); the rest is
prefilled in the next step. That is the prefill split kvshare's connector produces (it
fills the first tokens, vLLM computes the rest), obtained from vanilla vLLM.

A request may be *teacher-forced* (``Req.forced_from``): another request's generated
tokens are appended to its prompt, the engine generates one token, and vLLM's prompt
log-probabilities give its next-token distribution at every appended position (its
``top_k`` most likely tokens plus the forced one). Without ``reference_from`` the result
holds these rows (the reference's rows); with it, the child scores them against the
reference's rows position by position (:mod:`kvshare.bench.teacher_forcing`) and the
result holds the scores only. The connector is told where the real prompt ends
(``kvshare_prompt_tokens``), so it looks up, plans and claims as for the real prompt and
vLLM computes every scored position itself.

The child's environment has no ``KVSHARE_*`` variable: an engine's kvshare config is its
``EngineSpec.connector`` mapping and nothing else, so a variable left in the shell cannot
change a baseline or a connector system behind the benchmark's back.

Protocol: the parent writes a JSON job (``EngineSpec``, ``Req`` list, and ``known``
results of earlier engines that requests may refer to), the child writes a JSON list of
``Result``; all are plain dataclasses.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONNECTOR_NAME = "KVShareConnector"
CONNECTOR_MODULE = "kvshare.connector"
RHO_ARG = "kvshare_rho"
"""``SamplingParams.extra_args`` key the connector reads as a per-request rho."""
PROMPT_TOKENS_ARG = "kvshare_prompt_tokens"
"""``SamplingParams.extra_args`` key: positions from this one on are a forced continuation
(the connector looks up, plans and claims on the leading positions only)."""
ENV_PREFIX = "KVSHARE_"


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
    enforce_eager: bool = True
    """False runs vLLM's default compiled mode (torch.compile; slower to start)."""
    max_logprobs: int = 20
    """vLLM's cap on log-probabilities per position; >= every request's ``top_k``."""


@dataclass
class Req:
    """One request; it runs alone (plus its filler, if any)."""

    req_id: str
    token_ids: list[int]
    max_tokens: int = 64
    salt: str | None = None
    """vLLM ``cache_salt``: prefix-cache namespace and kvshare tenant."""
    rho: float | None = None
    """Per-request kvshare rho (connector engines only); None: the engine's config."""
    filler_ids: list[int] | None = None
    """Prompt submitted first in the same step to split the request's prefill in two
    (see :func:`kvshare.bench.quality.split_filler`)."""
    forced_from: str | None = None
    """Teacher forcing: append the generated tokens of this request (an earlier one of
    the job, or a known result) to the prompt; the request then generates one token."""
    top_k: int = 0
    """Teacher forcing: vLLM ranks this many most likely tokens per forced position."""
    reference_from: str | None = None
    """Teacher forcing: score against the rows of this teacher-forced request (same
    continuation); None returns this request's own rows instead."""


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
    recomputed, reused, fallback, seconds, load_seconds, sources; None when nothing was
    claimed."""
    forced_ids: list[list[int]] | None = None
    """Teacher forcing without a reference, one row per forced token: the engine's
    ``top_k`` most likely token ids there, plus the forced token."""
    forced_logprobs: list[list[float]] | None = None
    """Log-probabilities of ``forced_ids``, row by row, in nats."""
    forced_scores: list[dict[str, Any]] | None = None
    """Teacher forcing against a reference: one
    :class:`~kvshare.bench.teacher_forcing.PositionScore` (as a dict) per forced token."""


def warmup_requests(token_ids: list[int], count: int = 2) -> list[Req]:
    """Requests that absorb an engine's first-call costs before timed requests run, in
    scopes of their own so no timed request reuses them: ``count`` short prompts, then a
    prompt and the same prompt without its first token, which a connector engine fills
    from the first (lookup, load, re-rotation and selective recompute all run once, as
    ``kvshare serve``'s warm-up makes them run before the first user request)."""
    short = [Req(f"warmup/{i}", list(token_ids[:256]), 1, salt=f"warmup/{i}")
             for i in range(count)]
    prompt = list(token_ids[:1024])
    return short + [Req("warmup/fill/0", prompt, 1, salt="warmup/fill"),
                    Req("warmup/fill/1", prompt[1:], 1, salt="warmup/fill")]


def vllm_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every engine: no ``KVSHARE_*`` variable (an engine's kvshare
    config is its ``EngineSpec.connector``, nothing else), and one reserved core with or
    without a connector, so vanilla and connector engines compute with the same thread
    count."""
    environ = os.environ if environ is None else environ
    env = {name: value for name, value in environ.items() if not name.startswith(ENV_PREFIX)}
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_engine(spec: EngineSpec, requests: list[Req], known: Sequence[Result] = (),
               timeout_s: float = 3600.0, progress: bool = True) -> list[Result]:
    """Start ``spec`` in a child process, run ``requests`` in order, return their results.

    ``known``: results of earlier engines that requests refer to (``forced_from``,
    ``reference_from``). Raises :class:`EngineUnavailable` with the child's last error
    lines when the engine cannot start or a request fails.
    """
    with tempfile.TemporaryDirectory(prefix=f"kvshare-{spec.name}-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"spec": asdict(spec), "requests": [asdict(r) for r in requests],
                                   "known": [asdict(r) for r in known], "progress": progress}))
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
        return results_of(spec.name, rc, out, tail)


def results_of(name: str, rc: int, out: Path, tail: list[str]) -> list[Result]:
    """A child's results. The child writes them atomically once every request is served,
    so a crash while its engine shuts down (vLLM's CPU engine has aborted there:
    ``terminate called without an active exception``) leaves them complete: kept, with a
    warning. No results means the engine failed."""
    if not out.is_file():
        raise EngineUnavailable(f"engine {name!r} exited with {rc}: " + _error_of(tail))
    if rc != 0:
        logger.warning("engine %r exited with %d after writing all its results: %s",
                       name, rc, _error_of(tail))
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
        enable_prefix_caching=spec.enable_prefix_caching, enforce_eager=spec.enforce_eager,
        gpu_memory_utilization=0.3, kv_cache_memory_bytes=spec.kv_cache_bytes,
        max_num_seqs=4, seed=spec.seed, dtype="bfloat16", max_logprobs=spec.max_logprobs,
    )
    if spec.connector is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_connector_module_path=CONNECTOR_MODULE,
            kv_role="kv_both", kv_connector_extra_config=dict(spec.connector))
    return LLM(**kwargs)


def _serve(llm, req: Req, forced: list[int] | None = None,
           reference: Result | None = None) -> Result:
    """Run ``req`` alone (after its filler, if any); ``forced``: its teacher-forced tokens,
    ``reference``: the teacher-forced result to score its rows against."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    extra_args: dict[str, Any] = {}
    if req.rho is not None:
        extra_args[RHO_ARG] = req.rho
    prompt_ids = list(req.token_ids)
    if forced is None:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, logprobs=0,
                                extra_args=extra_args or None)
    else:
        extra_args[PROMPT_TOKENS_ARG] = len(prompt_ids)
        prompt_ids += forced
        # vLLM skips its prefix cache and every connector claim for requests that ask for
        # prompt log-probabilities unless told otherwise; the point is to score them *with*
        # the reused KV. No detokenizing: ids and numbers are all that is read.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=req.top_k,
                                skip_reading_prefix_cache=False, detokenize=False,
                                flat_logprobs=True, extra_args=extra_args)
    prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids}
    if req.salt:
        prompt["cache_salt"] = req.salt
    if req.filler_ids:
        filler = {"prompt_token_ids": list(req.filler_ids), "cache_salt": f"{req.req_id}/filler"}
        engine.add_request(f"{req.req_id}/filler", filler,
                           SamplingParams(max_tokens=1, temperature=0.0))
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
    result.text = final.outputs[0].text or ""
    logprobs = final.outputs[0].logprobs
    if logprobs and result.output_ids:
        first = logprobs[0].get(result.output_ids[0])
        result.first_logprob = None if first is None else float(first.logprob)
    result.num_cached_tokens = int(final.num_cached_tokens or 0)
    params_out = final.kv_transfer_params or {}
    result.kvshare = params_out.get("kvshare") if isinstance(params_out, dict) else None
    if forced is not None:
        rows = _forced_rows(req, final, len(req.token_ids), len(forced))
        if reference is None:
            result.forced_ids = [list(row) for row in rows]
            result.forced_logprobs = [list(row.values()) for row in rows]
        else:
            result.forced_scores = _scores(req, rows, reference)
    return result


def _forced_rows(req: Req, final, prompt_tokens: int, forced_tokens: int
                 ) -> list[dict[int, float]]:
    """Token id -> log-probability at each forced position ``prompt_tokens + i``.

    vLLM computes prompt log-probabilities only for the positions it prefilled itself; a
    row of a position taken from a cache would be garbage, so a cached position past the
    real prompt's last token is an error, not a number.
    """
    if final.num_cached_tokens and final.num_cached_tokens > prompt_tokens - 1:
        raise RuntimeError(
            f"request {req.req_id}: {final.num_cached_tokens} of its positions came from a "
            f"cache, but teacher forcing needs vLLM to compute every position from "
            f"{prompt_tokens - 1} on (the real prompt has {prompt_tokens} tokens)")
    rows = final.prompt_logprobs
    if rows is None or len(rows) != prompt_tokens + forced_tokens:
        raise RuntimeError(f"request {req.req_id}: expected prompt log-probabilities for "
                           f"{prompt_tokens + forced_tokens} positions, got "
                           f"{None if rows is None else len(rows)}")
    return [{int(token): float(entry.logprob) for token, entry in rows[position].items()}
            for position in range(prompt_tokens, prompt_tokens + forced_tokens)]


def _scores(req: Req, rows: list[dict[int, float]], reference: Result) -> list[dict[str, Any]]:
    from kvshare.bench.teacher_forcing import Row, score_position

    if reference.forced_ids is None or reference.forced_logprobs is None:
        raise ValueError(f"request {req.req_id}: reference {reference.req_id!r} has no rows "
                         "(it was not teacher-forced without a reference)")
    if len(reference.forced_ids) != len(rows):
        raise ValueError(f"request {req.req_id}: {len(rows)} forced positions, but the "
                         f"reference {reference.req_id!r} has {len(reference.forced_ids)}")
    return [asdict(score_position(Row.of(ids, values), Row(row)))
            for ids, values, row in zip(reference.forced_ids, reference.forced_logprobs, rows)]


def _child(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    spec = EngineSpec(**job["spec"])
    requests = [Req(**r) for r in job["requests"]]
    known = {r["req_id"]: Result(**r) for r in job.get("known", [])}
    started = time.perf_counter()
    llm = _make_llm(spec)
    _say(f"{spec.name}: engine up in {time.perf_counter() - started:.0f} s, "
         f"{len(requests)} requests")
    results: dict[str, Result] = {}
    step = max(1, len(requests) // 10)
    for i, req in enumerate(requests):
        forced = reference = None
        if req.forced_from is not None:
            forced = _earlier(results, known, req, req.forced_from).output_ids
        if req.reference_from is not None:
            reference = _earlier(results, known, req, req.reference_from)
        results[req.req_id] = _serve(llm, req, forced, reference)
        if (i + 1) % step == 0 or i + 1 == len(requests):
            done = (i + 1) / len(requests)
            bar = "#" * int(20 * done)
            _say(f"{spec.name}: [{bar:<20}] {i + 1}/{len(requests)} "
                 f"({time.perf_counter() - started:.0f} s)")
    # Atomically: a crash while the engine shuts down leaves complete results or none.
    partial = Path(out_path).with_suffix(".partial")
    partial.write_text(json.dumps([asdict(r) for r in results.values()]))
    partial.replace(out_path)
    return 0


def _earlier(results: dict[str, Result], known: dict[str, Result], req: Req,
             req_id: str) -> Result:
    found = results.get(req_id) or known.get(req_id)
    if found is None:
        raise ValueError(f"request {req.req_id} refers to {req_id!r}, which is neither an "
                         "earlier request of this job nor a known result")
    return found


def _say(message: str) -> None:
    print(f"[kvshare-bench] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(_child(*sys.argv[1:3]))
