"""``kvshare bench ttft``: time to first token, vanilla vLLM vs vLLM + kvshare.

Replays the long prompts (``--min-tokens`` .. ``--max-tokens`` user-text tokens) of the
ShareGPT similar stream, in arrival order, as chat-template user turns, through two
engines started one after the other with the same settings: vanilla vLLM with prefix
caching, and vLLM with the kvshare connector (embedded default, fresh state directory).
Each request runs alone with ``max_tokens=2``; its TTFT is the wall time from submission
to the first token. A request is a *hit* when kvshare reused (vLLM prefix hit + loaded
chunks) at least ``--hit-reuse`` of its prompt, a *miss* when kvshare claimed nothing.
Reported: median speedup (vanilla TTFT / kvshare TTFT) over hits and median slowdown
(kvshare TTFT / vanilla TTFT) over misses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvshare.bench.workload import add_prompt_length_arguments, check_prompt_lengths

MAX_TOKENS = 2
"""Two output tokens, not one: TTFT is taken at the first, and a request that finished in
its load step would come back before the connector's load report reached the scheduler
(measured: ``kv_transfer_params`` was None for every ``max_tokens=1`` claim)."""


EPILOG = """\
Both engines use the same settings (prefix caching on, one reserved CPU core, same token
budget) and run one after the other, each request alone (TTFT = time to its first token).
hit:  kvshare reused (vLLM prefix hit + loaded KV) >= --hit-reuse of the prompt
miss: kvshare claimed nothing (vLLM computed the prompt, maybe with its own prefix hit)

example: kvshare bench ttft --requests 40 --json results/ttft.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--requests", type=int, default=40, metavar="N",
                        help="replay the first N long similar-stream prompts; 0 = all (about "
                             "200) (default: 40, about 10 min on 2 CPU cores)")
    add_prompt_length_arguments(parser, 1000, 2048)
    parser.add_argument("--hit-reuse", type=float, default=0.85,
                        help="reused share of the prompt that makes a request a hit "
                             "(default: 0.85)")
    parser.add_argument("--rho", type=float, default=None,
                        help="kvshare DHD recompute share (default: the config's rho)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--out", type=Path, default=Path("results/ttft"),
                        help="directory for the markdown table and per-request timings "
                             "(default: results/ttft)")


@dataclass
class Timing:
    """One request on both engines."""

    req_id: str
    prompt_tokens: int
    vanilla_s: float
    kvshare_s: float
    reuse: float
    """Share of the prompt kvshare did not compute: vLLM prefix hit + loaded tokens."""
    claimed: bool
    vanilla_prefix_hit: int = 0
    fill_s: float = 0.0
    """kvshare worker's fill time (load + re-rotation + selective recompute + writes)."""
    load_s: float = 0.0
    """The part of ``fill_s`` spent fetching chunks and re-rotating keys."""
    recomputed: int = 0
    sources: int = 0


def reuse_fraction(prompt_tokens: int, num_cached_tokens: int, report: dict | None) -> float:
    """(vLLM prefix hit + tokens loaded from kvshare's cache) / prompt tokens.

    ``num_cached_tokens`` = prefix hit + the connector's claim; of the claim, ``loaded``
    tokens came from the cache (the rest were recomputed because their chunks were
    missing). DHD's extra recompute of loaded tokens does not lower reuse: it is time
    that the TTFT already includes.
    """
    if prompt_tokens <= 0:
        raise ValueError(f"prompt_tokens must be > 0, got {prompt_tokens}")
    reused = num_cached_tokens
    if report:
        reused += int(report.get("loaded", 0)) - int(report.get("claimed", 0))
    return max(0.0, min(1.0, reused / prompt_tokens))


def fill_details(report: dict | None) -> dict:
    """The ``Timing`` fields taken from the connector's load report (zeros without a claim)."""
    report = report or {}
    return {"fill_s": float(report.get("seconds", 0.0)),
            "load_s": float(report.get("load_seconds", 0.0)),
            "recomputed": int(report.get("recomputed", 0)),
            "sources": int(report.get("sources", 0))}


def summarize(timings: list[Timing], hit_reuse: float) -> dict:
    """The JSON summary: medians over hits and misses, with counts."""
    hits = [t for t in timings if t.claimed and t.reuse >= hit_reuse]
    misses = [t for t in timings if not t.claimed]
    partial = [t for t in timings if t.claimed and t.reuse < hit_reuse]

    def median(values):
        return statistics.median(values) if values else None

    return {
        "speedup_median_hits": median([t.vanilla_s / t.kvshare_s for t in hits]),
        "slowdown_median_misses": median([t.kvshare_s / t.vanilla_s for t in misses]),
        "n_hits": len(hits),
        "n_misses": len(misses),
        "n_partial": len(partial),
        "speedup_median_partial": median([t.vanilla_s / t.kvshare_s for t in partial]),
        "vanilla_ttft_median_s": median([t.vanilla_s for t in timings]),
        "kvshare_ttft_median_hits_s": median([t.kvshare_s for t in hits]),
        "vanilla_ttft_median_hits_s": median([t.vanilla_s for t in hits]),
        "kvshare_fill_median_hits_s": median([t.fill_s for t in hits]),
        "kvshare_load_median_hits_s": median([t.load_s for t in hits]),
        "hit_reuse": hit_reuse,
        "requests": len(timings),
        "mean_prompt_tokens": (sum(t.prompt_tokens for t in timings) / len(timings)
                               if timings else 0.0),
    }


def run(args: argparse.Namespace) -> int:
    if args.requests < 0:
        raise SystemExit(f"--requests must be >= 0, got {args.requests}")
    if not 0.0 < args.hit_reuse <= 1.0:
        raise SystemExit(f"--hit-reuse must be in (0, 1], got {args.hit_reuse}")
    check_prompt_lengths(args)
    if args.rho is not None and not 0.0 <= args.rho <= 1.0:
        raise SystemExit(f"--rho must be in [0, 1], got {args.rho}")
    started = time.perf_counter()
    prompts = long_prompts(args)
    if not prompts:
        raise SystemExit(
            f"no similar-stream prompt has {args.min_tokens}..{args.max_tokens} tokens")
    try:
        timings = measure(prompts, args)
    except RuntimeError as exc:
        print(f"kvshare bench ttft: {exc}")
        return 2
    summary = summarize(timings, args.hit_reuse)
    summary["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary)
    (args.out / "ttft.md").write_text(table)
    (args.out / "ttft_requests.json").write_text(
        json.dumps([vars(t) for t in timings], indent=1))
    print(table)
    print(f"table and per-request timings written to {args.out}/")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"JSON written to {args.json}")
    return 0


def long_prompts(args: argparse.Namespace) -> list[list[int]]:
    """Chat-template token ids of the long similar-stream prompts, in arrival order."""
    from kvshare.bench.quality import chat_ids
    from kvshare.bench.workload import load_workload
    from kvshare.config import KVShareConfig
    from kvshare.matching.embedder import make_embedder
    from kvshare.model_assets import load_tokenizer

    config = KVShareConfig.load(args.config)
    tokenizer = load_tokenizer(config.model)
    workload = load_workload(config, make_embedder(config.embedder, config.embed_max_chars),
                             tokenizer)
    chosen = [p for p in workload.similar_positions()
              if args.min_tokens <= len(workload.token_ids[p]) <= args.max_tokens]
    if args.requests:
        chosen = chosen[: args.requests]
    return [chat_ids(tokenizer, workload.texts[p]) for p in chosen]


def measure(prompts: list[list[int]], args: argparse.Namespace) -> list[Timing]:
    from kvshare.bench.vllm_runner import (
        EngineSpec,
        EngineUnavailable,
        Req,
        run_engine,
        warmup_requests,
    )
    from kvshare.config import KVShareConfig
    from kvshare.model_assets import resolve_model_dir

    config = KVShareConfig.load(args.config)
    longest = max(len(p) for p in prompts)
    spec_kwargs = dict(model_dir=str(resolve_model_dir(config.model, config.home_dir)),
                       max_num_batched_tokens=longest, max_model_len=max(2048, longest + 64))
    requests = warmup_requests(prompts[0]) + [
        Req(f"r{i}", ids, MAX_TOKENS) for i, ids in enumerate(prompts)]
    print(f"ttft: {len(prompts)} prompts, {min(map(len, prompts))}..{longest} tokens; "
          "vanilla engine, then kvshare engine")
    vanilla = {r.req_id: r for r in run_engine(EngineSpec("vanilla", **spec_kwargs), requests)}
    with tempfile.TemporaryDirectory(prefix="kvshare-ttft-") as home:
        extra = {"home": home, **({"rho": args.rho} if args.rho is not None else {})}
        try:
            shared = {r.req_id: r for r in run_engine(
                EngineSpec("kvshare", connector=extra, **spec_kwargs), requests)}
        except EngineUnavailable as exc:
            raise RuntimeError(f"connector not available: {exc}") from exc
    timings = []
    for i, ids in enumerate(prompts):
        v, k = vanilla[f"r{i}"], shared[f"r{i}"]
        timings.append(Timing(f"r{i}", len(ids), v.ttft_s, k.ttft_s,
                              reuse_fraction(len(ids), k.num_cached_tokens, k.kvshare),
                              claimed=bool(k.kvshare), vanilla_prefix_hit=v.num_cached_tokens,
                              **fill_details(k.kvshare)))
    return timings


def markdown_table(summary: dict) -> str:
    def fmt(value, unit="x"):
        return "-" if value is None else (f"{value:.2f}{unit}" if unit == "x"
                                          else f"{value * 1000:.0f} ms")

    return "\n".join([
        f"### TTFT, vanilla vLLM (prefix caching) vs kvshare: {summary['requests']} similar-"
        f"stream prompts, mean {summary['mean_prompt_tokens']:.0f} tokens\n",
        "| requests | n | vanilla TTFT p50 | kvshare TTFT p50 | median change |",
        "|---|---:|---:|---:|---:|",
        f"| hits (reuse >= {summary['hit_reuse']:.0%}) | {summary['n_hits']} | "
        f"{fmt(summary['vanilla_ttft_median_hits_s'], 's')} | "
        f"{fmt(summary['kvshare_ttft_median_hits_s'], 's')} | "
        f"{fmt(summary['speedup_median_hits'])} faster |",
        f"| partial reuse | {summary['n_partial']} | | | "
        f"{fmt(summary['speedup_median_partial'])} faster |",
        f"| misses (nothing claimed) | {summary['n_misses']} | | | "
        f"{fmt(summary['slowdown_median_misses'])} slower |",
        "",
        f"kvshare's fill on hits, median: {fmt(summary['kvshare_fill_median_hits_s'], 's')} "
        f"(of which loading chunks and re-rotating keys "
        f"{fmt(summary['kvshare_load_median_hits_s'], 's')})",
        "",
    ])
