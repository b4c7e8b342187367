"""``kvshare bench decode``: what the decode correction costs and what it buys.

The same held-out pairs as ``kvshare bench decode-drift`` (:func:`kvshare.bench.quality.
prepare_pairs`: ``--seed 7``, the pairs of seeds 1 and 2 left out). Two vLLM engines,
one after the other:

1. **kvshare**, the connector as users run it (vLLM's compiled mode unless ``--eager``,
   prefix caching on, the config's keys; as in ``bench quality`` any reuse is claimed).
   Per pair, in two tenants of their own, the earlier prompt is sent (and stored), then
   the later prompt generates ``--tokens`` greedy tokens, once with the decode
   correction and once without (``kvshare_decode_correction`` 1 / 0; which runs first
   alternates by pair). Each step returns its ``TOP_K`` most likely tokens with their
   log-probabilities; each request its TTFT and end-to-end time.
2. **full compute**, vanilla vLLM: the later prompt's greedy answer (for ROUGE-L), and
   each kvshare answer teacher-forced (prompt + that answer, ``prompt_logprobs``), which
   gives full compute's next-token distribution at every position of each run's own path
   (:mod:`kvshare.bench.teacher_forcing`).

Per pair and run: mean KL(full || kvshare) and top-1 agreement over the generated
positions, and ROUGE-L of the answer against full compute's. Gains are "off minus on"
for KL (positive: the correction lowered it) and "on minus off" for top-1 and ROUGE-L,
with a paired bootstrap 95% interval over pairs. ``tpot_overhead`` is the total time per
output token with the correction over the total without, minus one (TPOT = (end-to-end -
TTFT) / (tokens - 1), requests run one at a time).

Targets (issue 11): ``tpot_overhead`` <= 10%; ``kl_gain_ci`` excludes zero.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvshare.bench.engine_config import add_config_arguments
from kvshare.bench.workload import add_prompt_length_arguments, check_prompt_lengths

TOKENS = 256
"""Greedy tokens per answer (the issue's 256)."""
TOP_K = 20
"""Most likely tokens scored per position, on both sides (vLLM's default ``max_logprobs``)."""
BOOTSTRAP_SAMPLES = 10_000
TPOT_TARGET = 0.10
CORRECTION_ARG = "kvshare_decode_correction"
"""The connector's per-request switch (:data:`kvshare.connector.decode_correction.
CORRECTION_ARG`; not imported, so that the benchmark's parent never imports vLLM)."""
RUNS = ("on", "off")

EPILOG = """\
example (the full run; about 45 min on 2 CPU cores):
  kvshare bench decode --pairs 40 --seed 7 --exclude-seeds 1,2 --json results/decode.json

smoke run:
  kvshare bench decode --pairs 3 --tokens 32 --eager
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--pairs", type=int, default=40, metavar="N",
                        help="prompt pairs, half similar-stream, half edits (default: 40)")
    parser.add_argument("--seed", type=int, default=7,
                        help="seed that draws the pairs (default: 7, held out)")
    parser.add_argument("--exclude-seeds", default="1,2", metavar="S,S",
                        help="leave out the prompts of the pairs these seeds draw (default: "
                             "1,2, the tuning seeds)")
    parser.add_argument("--tokens", type=int, default=TOKENS, metavar="N",
                        help=f"greedy tokens per answer (default: {TOKENS})")
    parser.add_argument("--eager", action="store_true",
                        help="run vLLM with --enforce-eager (default: compiled, as users run)")
    add_prompt_length_arguments(parser, 64, 768)
    add_config_arguments(parser)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")


# ------------------------------------------------------------------------ kvshare engine
@dataclass
class DecodeReq:
    req_id: str
    token_ids: list[int]
    max_tokens: int
    salt: str
    correct: bool | None = None
    """``kvshare_decode_correction`` for this request; None: leave it to the config."""


@dataclass
class DecodeRun:
    req_id: str
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    step_ids: list[list[int]] = field(default_factory=list)
    """Per generated token: the engine's ``TOP_K`` most likely ids there, plus the token."""
    step_logprobs: list[list[float]] = field(default_factory=list)
    kvshare: dict[str, Any] | None = None

    @property
    def tpot_s(self) -> float | None:
        """Seconds per output token after the first."""
        if len(self.output_ids) < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (len(self.output_ids) - 1)


def run_kvshare_engine(spec, requests: list[DecodeReq], timeout_s: float = 4 * 3600.0
                       ) -> dict[str, DecodeRun]:
    """Run ``requests`` one at a time on the connector engine ``spec``, in a child process
    (:mod:`kvshare.bench.vllm_runner`'s engine and environment; this child also returns
    each step's top log-probabilities)."""
    from kvshare.bench.vllm_runner import EngineUnavailable, _error_of, _tee_progress, vllm_env

    with tempfile.TemporaryDirectory(prefix="kvshare-decode-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"spec": asdict(spec),
                                   "requests": [asdict(r) for r in requests]}))
        with (Path(tmp) / "stderr.log").open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "kvshare.bench.decode", str(job),
                                     str(out)], env=vllm_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            tail = _tee_progress(proc, log, True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise EngineUnavailable(f"engine {spec.name!r} exceeded {timeout_s:.0f} s"
                                        ) from None
        if not out.is_file():
            raise EngineUnavailable(f"engine {spec.name!r} exited with {rc}: "
                                    + _error_of(tail))
        return {item["req_id"]: DecodeRun(**item) for item in json.loads(out.read_text())}


def _serve(llm, req: DecodeReq) -> DecodeRun:
    from vllm import SamplingParams

    engine = llm.llm_engine
    extra = {} if req.correct is None else {CORRECTION_ARG: int(req.correct)}
    params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True,
                            logprobs=TOP_K, extra_args=extra or None)
    started = time.perf_counter()
    engine.add_request(req.req_id, {"prompt_token_ids": list(req.token_ids),
                                    "cache_salt": req.salt}, params)
    run, final = DecodeRun(req.req_id), None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if not run.ttft_s and output.outputs and output.outputs[0].token_ids:
                run.ttft_s = time.perf_counter() - started
            if output.finished:
                final = output
    run.e2e_s = time.perf_counter() - started
    completion = final.outputs[0]
    run.output_ids, run.text = list(completion.token_ids), completion.text or ""
    for row in completion.logprobs or []:
        run.step_ids.append([int(token) for token in row])
        run.step_logprobs.append([float(entry.logprob) for entry in row.values()])
    params_out = final.kv_transfer_params or {}
    run.kvshare = params_out.get("kvshare") if isinstance(params_out, dict) else None
    return run


def _child(job_path: str, out_path: str) -> int:
    from kvshare.bench.vllm_runner import EngineSpec, _make_llm, _say

    job = json.loads(Path(job_path).read_text())
    spec = EngineSpec(**job["spec"])
    requests = [DecodeReq(**r) for r in job["requests"]]
    started = time.perf_counter()
    llm = _make_llm(spec)
    _say(f"{spec.name}: engine up in {time.perf_counter() - started:.0f} s, "
         f"{len(requests)} requests")
    runs = []
    for i, req in enumerate(requests):
        runs.append(_serve(llm, req))
        if (i + 1) % max(1, len(requests) // 10) == 0 or i + 1 == len(requests):
            _say(f"{spec.name}: {i + 1}/{len(requests)} ({time.perf_counter() - started:.0f} s)")
    partial = Path(out_path).with_suffix(".partial")
    partial.write_text(json.dumps([asdict(run) for run in runs]))
    partial.replace(out_path)
    return 0


# ------------------------------------------------------------------------ statistics
def paired_bootstrap(differences: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of paired ``differences`` (percentile bootstrap over
    pairs)."""
    import numpy as np

    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        raise ValueError("a bootstrap needs at least one pair")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (samples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class PairScore:
    """One run (correction on or off) of one pair against full compute."""

    kl: float
    """Mean KL(full || kvshare) over the generated positions, nats."""
    top1: float
    rouge_l: float
    tpot_s: float | None
    corrected: int
    reused: int


def score_run(run: DecodeRun, full_ids: list[list[int]], full_logprobs: list[list[float]],
              full_text: str) -> PairScore:
    """Compare ``run``'s per-step rows with full compute's teacher-forced rows on its path."""
    from kvshare.bench.quality import rouge_l
    from kvshare.bench.teacher_forcing import Row, score_position, summarize

    if len(full_ids) != len(run.step_ids):
        raise ValueError(f"{run.req_id}: {len(run.step_ids)} generated positions, but full "
                         f"compute scored {len(full_ids)}")
    scores = summarize(score_position(Row.of(ref_ids, ref_values), Row.of(ids, values))
                       for ref_ids, ref_values, ids, values
                       in zip(full_ids, full_logprobs, run.step_ids, run.step_logprobs))
    report = run.kvshare or {}
    return PairScore(scores.kl_mean, scores.top1_agree, rouge_l(run.text, full_text),
                     run.tpot_s, int(report.get("corrected", 0)), int(report.get("reused", 0)))


def summarize_pairs(scores: dict[str, dict[str, PairScore]]) -> dict[str, Any]:
    """The benchmark's figures from per-pair scores (pair id -> run -> score)."""
    pair_ids = sorted(scores)
    on = [scores[p]["on"] for p in pair_ids]
    off = [scores[p]["off"] for p in pair_ids]
    kl_gain = [b.kl - a.kl for a, b in zip(on, off)]
    top1_gain = [a.top1 - b.top1 for a, b in zip(on, off)]
    rouge_gain = [a.rouge_l - b.rouge_l for a, b in zip(on, off)]
    timed = [(a.tpot_s, b.tpot_s) for a, b in zip(on, off)
             if a.tpot_s is not None and b.tpot_s is not None]
    kl_off = statistics.fmean(s.kl for s in off)
    return {
        "pairs": len(pair_ids),
        "pairs_corrected": sum(s.corrected > 0 for s in on),
        "corrected_tokens_mean": statistics.fmean(s.corrected for s in on),
        "reused_tokens_mean": statistics.fmean(s.reused for s in on),
        "kl_on": statistics.fmean(s.kl for s in on), "kl_off": kl_off,
        "kl_gain": statistics.fmean(kl_gain), "kl_gain_ci": list(paired_bootstrap(kl_gain)),
        "kl_reduction": statistics.fmean(kl_gain) / kl_off if kl_off else None,
        "top1_on": statistics.fmean(s.top1 for s in on),
        "top1_off": statistics.fmean(s.top1 for s in off),
        "top1_gain": statistics.fmean(top1_gain),
        "top1_gain_ci": list(paired_bootstrap(top1_gain)),
        "rouge_l_on": statistics.fmean(s.rouge_l for s in on),
        "rouge_l_off": statistics.fmean(s.rouge_l for s in off),
        "rouge_l_gain": statistics.fmean(rouge_gain),
        "rouge_l_gain_ci": list(paired_bootstrap(rouge_gain)),
        "tpot_on_s": statistics.fmean(a for a, _ in timed) if timed else None,
        "tpot_off_s": statistics.fmean(b for _, b in timed) if timed else None,
        "tpot_overhead": (sum(a for a, _ in timed) / sum(b for _, b in timed) - 1
                          if timed else None),
    }


def targets(summary: dict[str, Any]) -> dict[str, bool]:
    overhead, (low, _) = summary["tpot_overhead"], summary["kl_gain_ci"]
    return {"tpot_overhead_at_most_10pct": overhead is not None and overhead <= TPOT_TARGET,
            "kl_gain_ci_excludes_zero": low > 0}


def markdown_report(results: dict[str, Any]) -> str:
    s = results["summary"]

    def ci(key: str, spec: str) -> str:
        low, high = s[key]
        return f"[{low:{spec}}, {high:{spec}}]"

    lines = [
        f"### Decode correction: {s['pairs']} pairs (seed {results['seed']}), "
        f"{results['tokens']} tokens each, {s['pairs_corrected']} pairs corrected "
        f"({s['corrected_tokens_mean']:.1f} tokens on average, of "
        f"{s['reused_tokens_mean']:.1f} reused)\n",
        "| | correction off | correction on | gain | 95% interval |",
        "|---|---:|---:|---:|---|",
        f"| KL(full ‖ kvshare), nats/token | {s['kl_off']:.5f} | {s['kl_on']:.5f} | "
        f"{s['kl_gain']:.5f} ({_pct(s['kl_reduction'])}) | {ci('kl_gain_ci', '.5f')} |",
        f"| top-1 = full | {s['top1_off']:.2%} | {s['top1_on']:.2%} | "
        f"{s['top1_gain']:+.2%} | {ci('top1_gain_ci', '+.2%')} |",
        f"| ROUGE-L vs full's answer | {s['rouge_l_off']:.3f} | {s['rouge_l_on']:.3f} | "
        f"{s['rouge_l_gain']:+.3f} | {ci('rouge_l_gain_ci', '+.3f')} |",
        f"| TPOT, ms | {_ms(s['tpot_off_s'])} | {_ms(s['tpot_on_s'])} | overhead "
        f"{_pct(s['tpot_overhead'])} | |",
        "",
        "targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}"
                                for name, ok in results["targets"].items()),
    ]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


# ------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    from kvshare.bench.engine_config import base_config, connector_config
    from kvshare.bench.quality import excluded_seeds, prepare_pairs
    from kvshare.bench.vllm_runner import EngineSpec, Req, run_engine, warmup_requests
    from kvshare.model_assets import resolve_model_dir

    if args.pairs < 2:
        raise SystemExit(f"--pairs must be >= 2 (half similar, half edits), got {args.pairs}")
    if args.tokens < 2:
        raise SystemExit(f"--tokens must be >= 2 (TPOT needs two), got {args.tokens}")
    check_prompt_lengths(args)
    excluded = excluded_seeds(args)
    base = base_config(args.config, args.sets)
    started = time.perf_counter()
    pairs = prepare_pairs(args, base, excluded)
    model_dir = str(resolve_model_dir(base.model, base.home_dir))
    max_len = max(len(p.later_ids) for p in pairs) + args.tokens + 8
    with tempfile.TemporaryDirectory(prefix="kvshare-bench-decode-") as home:
        connector = connector_config(base, home=home, min_reuse_fraction=0.0,
                                     min_reuse_tokens=1)
        spec = EngineSpec("kvshare", model_dir, max_model_len=max(4096, max_len),
                          connector=connector, enforce_eager=args.eager, max_logprobs=TOP_K)
        requests = [DecodeReq(r.req_id, r.token_ids, r.max_tokens, r.salt)
                    for r in warmup_requests(pairs[0].later_ids)]
        for i, pair in enumerate(pairs):
            for name in (RUNS if i % 2 == 0 else RUNS[::-1]):
                salt = f"{name}/{pair.pair_id}"
                requests += [DecodeReq(f"earlier/{salt}", pair.earlier_ids, 1, salt),
                             DecodeReq(f"{name}/{pair.pair_id}", pair.later_ids, args.tokens,
                                       salt, correct=name == "on")]
        runs = run_kvshare_engine(spec, requests)
    vanilla = EngineSpec("full", model_dir, max_model_len=max(4096, max_len),
                         enforce_eager=args.eager, max_logprobs=TOP_K)
    from kvshare.bench.vllm_runner import Result

    known = [Result(key, output_ids=runs[key].output_ids)
             for pair in pairs for key in (f"{n}/{pair.pair_id}" for n in RUNS)]
    full_requests = [
        req for pair in pairs for req in (
            Req(f"full/{pair.pair_id}", pair.later_ids, args.tokens,
                salt=f"full/{pair.pair_id}"),
            *(Req(f"tf/{n}/{pair.pair_id}", pair.later_ids, 1, salt=f"tf/{n}/{pair.pair_id}",
                  forced_from=f"{n}/{pair.pair_id}", top_k=TOP_K) for n in RUNS))]
    full = {r.req_id: r for r in run_engine(vanilla, full_requests, known)}
    scores = {
        pair.pair_id: {
            n: score_run(runs[f"{n}/{pair.pair_id}"],
                         full[f"tf/{n}/{pair.pair_id}"].forced_ids,
                         full[f"tf/{n}/{pair.pair_id}"].forced_logprobs,
                         full[f"full/{pair.pair_id}"].text)
            for n in RUNS}
        for pair in pairs}
    summary = summarize_pairs(scores)
    results = {"seed": args.seed, "excluded_seeds": excluded, "tokens": args.tokens,
               "compiled": not args.eager, "top_k": TOP_K,
               "config": {k: connector[k] for k in connector if k.startswith("decode_")
                          or k in ("rho", "check_layers", "select_by")},
               "summary": summary, "targets": targets(summary),
               "per_pair": {p: {n: asdict(s) for n, s in runs_.items()}
                            for p, runs_ in scores.items()},
               "wall_s": time.perf_counter() - started}
    print(markdown_report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(*sys.argv[1:3]))
