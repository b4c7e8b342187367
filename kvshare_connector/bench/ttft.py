"""``kvshare bench ttft``: time to first token, vanilla vLLM vs vLLM + kvshare.

Replays the long prompts (``--min-tokens`` .. ``--max-tokens`` user-text tokens) of the
ShareGPT similar stream, in arrival order, as chat-template user turns, through two
engines started one after the other with the same settings: vanilla vLLM with prefix
caching, and vLLM with the kvshare connector (the config of ``--config``/``--set``, a
fresh state directory). Each request runs alone with ``max_tokens=2``; its TTFT is the
wall time from submission to the first token. ``--compiled`` runs both engines in vLLM's
default compiled mode instead of eager mode.

Per request (:mod:`kvshare.bench.reuse`): *reused* = vLLM's prefix hit + claimed tokens
kvshare loaded and did not recompute; *found* = prefix hit + claimed tokens whose KV
kvshare loaded (some of which DHD then recomputed). A request is a *hit* when kvshare
claimed it and found at least ``--hit-found`` of its prompt, *partial* when it claimed
less, a *miss* when it claimed nothing. Reported: median speedup (vanilla TTFT / kvshare
TTFT) over hits, partial hits and all requests, median slowdown (kvshare / vanilla) over
misses, the median reused share, and the requests whose fill fell back to full
recompute.

``--shadow-overhead`` runs the kvshare engine a second time with shadow checks off
(``shadow_sample_rate=0``) and reports what the checks at the config's rate (default 1%
of claimed requests) add to kvshare's mean TTFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvshare.bench.engine_config import add_config_arguments
from kvshare.bench.reuse import RequestReuse
from kvshare.bench.workload import add_prompt_length_arguments, check_prompt_lengths

MAX_TOKENS = 2
"""Two output tokens, not one: TTFT is taken at the first, and a request that finished in
its load step would come back before the connector's load report reached the scheduler
(measured: ``kv_transfer_params`` was None for every ``max_tokens=1`` claim)."""


EPILOG = """\
Both engines use the same settings (prefix caching on, one reserved CPU core, same token
budget, eager or --compiled) and run one after the other, each request alone (TTFT = time
to its first token).
reused: vLLM prefix hit + KV kvshare loaded and did not recompute
found:  vLLM prefix hit + KV kvshare loaded (DHD may recompute some of it)
hit:    kvshare claimed the request and found >= --hit-found of the prompt
miss:   kvshare claimed nothing (vLLM computed the prompt, maybe with its own prefix hit)

example: kvshare bench ttft --requests 40 --json results/ttft.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--requests", type=int, default=40, metavar="N",
                        help="replay the first N long similar-stream prompts; 0 = all (about "
                             "200) (default: 40, about 10 min on 2 CPU cores)")
    add_prompt_length_arguments(parser, 1000, 2048)
    parser.add_argument("--hit-found", type=float, default=0.85,
                        help="share of the prompt found in the caches (vLLM prefix hit + KV "
                             "kvshare loaded) that makes a claimed request a hit "
                             "(default: 0.85)")
    parser.add_argument("--rho", type=float, default=None,
                        help="kvshare DHD recompute share (default: the config's rho)")
    parser.add_argument("--shadow-overhead", action="store_true",
                        help="also run kvshare with shadow checks off and report the mean "
                             "TTFT the checks at the config's shadow_sample_rate add (a "
                             "third engine run)")
    parser.add_argument("--compiled", action="store_true",
                        help="run both engines in vLLM's default compiled mode (torch.compile) "
                             "instead of enforce_eager; engines start more slowly")
    add_config_arguments(parser)
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
    reused: float
    """Share of the prompt loaded and not recomputed: vLLM prefix hit + kvshare's reused."""
    found: float
    """Share of the prompt whose KV a cache held: vLLM prefix hit + kvshare's loaded."""
    claimed: bool
    fallback: bool = False
    """kvshare's selective fill failed and the claim was recomputed in full."""
    vanilla_prefix_hit: int = 0
    fill_s: float = 0.0
    """kvshare worker's fill time (load + re-rotation + selective recompute + writes)."""
    load_s: float = 0.0
    """The part of ``fill_s`` spent fetching chunks and re-rotating keys."""
    recomputed: int = 0
    sources: int = 0
    shadow: bool = False
    """kvshare shadow-checked this request's fill."""
    unchecked_s: float | None = None
    """kvshare TTFT with shadow checks off (``--shadow-overhead`` only)."""


def timing(req_id: str, prompt_tokens: int, vanilla, kvshare, unchecked=None) -> Timing:
    """The ``Timing`` of one request from its engines' results (``unchecked``: kvshare
    with shadow checks off, if it ran)."""
    reuse = RequestReuse.of(prompt_tokens, kvshare.num_cached_tokens, kvshare.kvshare)
    report = kvshare.kvshare or {}
    return Timing(req_id, prompt_tokens, vanilla.ttft_s, kvshare.ttft_s,
                  reused=reuse.reused_fraction, found=reuse.found_fraction,
                  claimed=reuse.claimed > 0, fallback=reuse.fallback,
                  vanilla_prefix_hit=vanilla.num_cached_tokens,
                  fill_s=float(report.get("seconds", 0.0)),
                  load_s=float(report.get("load_seconds", 0.0)),
                  recomputed=reuse.recomputed, sources=int(report.get("sources", 0)),
                  shadow=bool(report.get("shadow", False)),
                  unchecked_s=unchecked.ttft_s if unchecked is not None else None)


def summarize(timings: list[Timing], hit_found: float) -> dict:
    """The JSON summary: medians over all requests, hits, partial hits and misses."""
    hits = [t for t in timings if t.claimed and t.found >= hit_found]
    misses = [t for t in timings if not t.claimed]
    partial = [t for t in timings if t.claimed and t.found < hit_found]

    def median(values):
        values = list(values)
        return statistics.median(values) if values else None

    return {
        "speedup_median_all": median(t.vanilla_s / t.kvshare_s for t in timings),
        "speedup_median_hits": median(t.vanilla_s / t.kvshare_s for t in hits),
        "speedup_median_partial": median(t.vanilla_s / t.kvshare_s for t in partial),
        "slowdown_median_misses": median(t.kvshare_s / t.vanilla_s for t in misses),
        "n_hits": len(hits),
        "n_partial": len(partial),
        "n_misses": len(misses),
        "reused_median": median(t.reused for t in timings),
        "reused_median_hits": median(t.reused for t in hits),
        "found_median_hits": median(t.found for t in hits),
        "vanilla_ttft_median_s": median(t.vanilla_s for t in timings),
        "kvshare_ttft_median_s": median(t.kvshare_s for t in timings),
        "kvshare_ttft_median_hits_s": median(t.kvshare_s for t in hits),
        "vanilla_ttft_median_hits_s": median(t.vanilla_s for t in hits),
        "kvshare_fill_median_hits_s": median(t.fill_s for t in hits),
        "kvshare_load_median_hits_s": median(t.load_s for t in hits),
        "fallbacks": {"vanilla": 0, "kvshare": sum(t.fallback for t in timings)},
        "shadow_checks": sum(t.shadow for t in timings),
        **shadow_overhead(timings),
        "hit_found": hit_found,
        "requests": len(timings),
        "mean_prompt_tokens": (sum(t.prompt_tokens for t in timings) / len(timings)
                               if timings else 0.0),
    }


def shadow_overhead(timings: list[Timing]) -> dict:
    """Mean kvshare TTFT with shadow checks on and off, and the relative overhead; empty
    without a run with checks off."""
    if not timings or any(t.unchecked_s is None for t in timings):
        return {}
    checked = statistics.fmean(t.kvshare_s for t in timings)
    unchecked = statistics.fmean(t.unchecked_s for t in timings)
    return {"kvshare_ttft_mean_s": checked, "kvshare_unchecked_ttft_mean_s": unchecked,
            "shadow_ttft_overhead": checked / unchecked - 1.0}


def run(args: argparse.Namespace) -> int:
    from kvshare.bench.engine_config import base_config, ignored_environment

    if args.requests < 0:
        raise SystemExit(f"--requests must be >= 0, got {args.requests}")
    if not 0.0 < args.hit_found <= 1.0:
        raise SystemExit(f"--hit-found must be in (0, 1], got {args.hit_found}")
    check_prompt_lengths(args)
    if args.rho is not None and not 0.0 <= args.rho <= 1.0:
        raise SystemExit(f"--rho must be in [0, 1], got {args.rho}")
    base = base_config(args.config, args.sets)
    ignored = ignored_environment()
    if ignored:
        print(f"ttft: ignoring {', '.join(ignored)} (the kvshare engine takes its config from "
              "--config and --set only)")
    started = time.perf_counter()
    prompts = long_prompts(args, base)
    if not prompts:
        raise SystemExit(
            f"no similar-stream prompt has {args.min_tokens}..{args.max_tokens} tokens")
    try:
        timings, engines = measure(prompts, args, base)
    except RuntimeError as exc:
        print(f"kvshare bench ttft: {exc}")
        return 2
    summary = summarize(timings, args.hit_found)
    summary.update(engines=engines, ignored_environment=ignored,
                   wall_s=time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary)
    (args.out / "ttft.md").write_text(table)
    (args.out / "ttft_requests.json").write_text(
        json.dumps([asdict(t) for t in timings], indent=1))
    print(table)
    print(f"table and per-request timings written to {args.out}/")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"JSON written to {args.json}")
    return 0


def long_prompts(args: argparse.Namespace, config) -> list[list[int]]:
    """Chat-template token ids of the long similar-stream prompts, in arrival order."""
    from kvshare.bench.quality import chat_ids
    from kvshare.bench.workload import load_workload
    from kvshare.matching.embedder import make_embedder
    from kvshare.model_assets import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    workload = load_workload(config, make_embedder(config.embedder, config.embed_max_chars),
                             tokenizer)
    chosen = [p for p in workload.similar_positions()
              if args.min_tokens <= len(workload.token_ids[p]) <= args.max_tokens]
    if args.requests:
        chosen = chosen[: args.requests]
    return [chat_ids(tokenizer, workload.texts[p]) for p in chosen]


def measure(prompts: list[list[int]], args: argparse.Namespace, base
            ) -> tuple[list[Timing], dict]:
    """Both engines over ``prompts``; the timings and what each engine ran with."""
    from kvshare.bench.engine_config import connector_config
    from kvshare.bench.vllm_runner import (
        EngineSpec,
        EngineUnavailable,
        Req,
        run_engine,
        warmup_requests,
    )
    from kvshare.model_assets import resolve_model_dir

    longest = max(len(p) for p in prompts)
    spec_kwargs = dict(model_dir=str(resolve_model_dir(base.model, base.home_dir)),
                       max_num_batched_tokens=longest, max_model_len=max(2048, longest + 64),
                       enforce_eager=not args.compiled)
    requests = warmup_requests(prompts[0]) + [
        Req(f"r{i}", ids, MAX_TOKENS) for i, ids in enumerate(prompts)]
    mode = "compiled" if args.compiled else "eager"
    print(f"ttft: {len(prompts)} prompts, {min(map(len, prompts))}..{longest} tokens, {mode} "
          "mode; vanilla engine, then kvshare engine")
    vanilla = {r.req_id: r for r in run_engine(EngineSpec("vanilla", **spec_kwargs), requests)}
    with tempfile.TemporaryDirectory(prefix="kvshare-ttft-") as home:
        config = connector_config(base, home=home,
                                  **({"rho": args.rho} if args.rho is not None else {}))
        try:
            shared = {r.req_id: r for r in run_engine(
                EngineSpec("kvshare", connector=config, **spec_kwargs), requests)}
        except EngineUnavailable as exc:
            raise RuntimeError(f"connector not available: {exc}") from exc
    unchecked = {}
    if args.shadow_overhead:
        with tempfile.TemporaryDirectory(prefix="kvshare-ttft-") as home:
            off = {**config, "home": home, "shadow_sample_rate": 0.0}
            try:
                unchecked = {r.req_id: r for r in run_engine(
                    EngineSpec("kvshare-unchecked", connector=off, **spec_kwargs), requests)}
            except EngineUnavailable as exc:
                raise RuntimeError(f"connector not available: {exc}") from exc
    engines = {"vanilla": {"enforce_eager": not args.compiled, "config": None},
               "kvshare": {"enforce_eager": not args.compiled,
                           "config": {**config, "home": "(temporary)"}}}
    if args.shadow_overhead:
        engines["kvshare-unchecked"] = {"enforce_eager": not args.compiled,
                                        "config": {**config, "home": "(temporary)",
                                                   "shadow_sample_rate": 0.0}}
    return [timing(f"r{i}", len(ids), vanilla[f"r{i}"], shared[f"r{i}"],
                   unchecked.get(f"r{i}")) for i, ids in enumerate(prompts)], engines


def markdown_table(summary: dict) -> str:
    from kvshare.bench.quality import format_or_dash as cell

    def ms(value):
        return cell(value, ".0f", " ms", scale=1000)

    fallbacks = summary["fallbacks"]["kvshare"]
    mode = ("" if "engines" not in summary else
            ", compiled mode" if not summary["engines"]["kvshare"]["enforce_eager"]
            else ", eager mode")
    return "\n".join([
        f"### TTFT, vanilla vLLM (prefix caching) vs kvshare: {summary['requests']} similar-"
        f"stream prompts, mean {summary['mean_prompt_tokens']:.0f} tokens{mode}\n",
        "| requests | n | reused p50 | vanilla TTFT p50 | kvshare TTFT p50 | median change |",
        "|---|---:|---:|---:|---:|---:|",
        f"| all | {summary['requests']} | {cell(summary['reused_median'], '.0%')} | "
        f"{ms(summary['vanilla_ttft_median_s'])} | {ms(summary['kvshare_ttft_median_s'])} | "
        f"{cell(summary['speedup_median_all'], '.2f', 'x')} faster |",
        f"| hits (found >= {summary['hit_found']:.0%}) | {summary['n_hits']} | "
        f"{cell(summary['reused_median_hits'], '.0%')} | "
        f"{ms(summary['vanilla_ttft_median_hits_s'])} | "
        f"{ms(summary['kvshare_ttft_median_hits_s'])} | "
        f"{cell(summary['speedup_median_hits'], '.2f', 'x')} faster |",
        f"| partial (claimed, found less) | {summary['n_partial']} | | | | "
        f"{cell(summary['speedup_median_partial'], '.2f', 'x')} faster |",
        f"| misses (nothing claimed) | {summary['n_misses']} | | | | "
        f"{cell(summary['slowdown_median_misses'], '.2f', 'x')} slower |",
        "",
        "reused: vLLM prefix hit + KV kvshare loaded and did not recompute; found: vLLM "
        "prefix hit + KV kvshare loaded (DHD recomputes part of it).",
        f"kvshare's fill on hits, median: {ms(summary['kvshare_fill_median_hits_s'])} "
        f"(of which loading chunks and re-rotating keys "
        f"{ms(summary['kvshare_load_median_hits_s'])})",
        (f"**fallbacks**: {fallbacks} of {summary['requests']} kvshare requests fell back to "
         "full recompute (selective fill failed)" if fallbacks else "fallbacks: none"),
        f"shadow checks: {summary.get('shadow_checks', 0)} requests"
        + (f"; mean kvshare TTFT {ms(summary['kvshare_ttft_mean_s'])} with them, "
           f"{ms(summary['kvshare_unchecked_ttft_mean_s'])} with checks off: "
           f"{summary['shadow_ttft_overhead']:+.1%}"
           if "shadow_ttft_overhead" in summary else ""),
        "",
    ])
