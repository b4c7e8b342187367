"""``kvshare bench quality``: how close reused-KV answers stay to full compute.

Pairs (earlier prompt, similar later prompt) of real ShareGPT user turns, see
:mod:`kvshare.bench.pairs`, are wrapped in the model's chat template. For every system
the earlier prompt is sent first (so it is cached), then the later one; its 64 greedy
tokens are compared with the *reference*: vanilla vLLM's greedy output for the later
prompt, prefilled in one step.

Systems (each pair gets its own ``cache_salt``, so pairs never reuse each other):

* ``kvshare``: the connector with DHD selective recompute at ``--rho``.
* ``naive``: the connector recomputing only placeholders and boundaries
  (``check_layers=[]``).
* ``cacheblend``: the connector with the ``chunk256`` planner (exact 256-token chunks at
  any position, LMCache/CacheBlend style) and 15% deviation recompute.
* ``gptcache``: the earlier prompt's vanilla answer, returned as is.
* ``prefix``: vanilla vLLM with prefix caching, earlier prompt sent first.
* ``split``: vanilla vLLM prefilling the later prompt as N-1 tokens then 1 (what the
  connector's fills look like to vLLM): vLLM's own numerical noise floor.

Metrics per system: mean ROUGE-L F1 vs the reference, exact-match rate (all 64 tokens),
first-token agreement, recomputed-token fraction (prompt tokens the model computed for
the later request: from the connector's per-request load report and vLLM's cached-token
count), median TTFT of the later request. ``--sweep`` adds kvshare at several rho values
and plots quality against TTFT.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvshare.bench.workload import add_prompt_length_arguments, check_prompt_lengths

logger = logging.getLogger(__name__)

SYSTEMS = ("kvshare", "naive", "cacheblend", "gptcache", "prefix", "split")
CONNECTOR_SYSTEMS = ("kvshare", "naive", "cacheblend")
SWEEP_RHOS = (0.0, 0.05, 0.15, 0.3, 1.0)
CACHEBLEND_RHO = 0.15
MAX_TOKENS = 64
METRIC_KEYS = ("rouge_l", "exact_match", "first_token_agree", "recompute_fraction")


EPILOG = """\
systems (each pair has its own cache_salt, so pairs never reuse each other):
  kvshare     the connector, DHD selective recompute at --rho
  naive       the connector recomputing only placeholders and boundaries
  cacheblend  the connector, exact 256-token chunks at any position + 15% recompute
  gptcache    the earlier prompt's answer, returned as is
  prefix      vanilla vLLM with prefix caching (earlier prompt sent first)
  split       vanilla vLLM prefilling the later prompt as N-1 tokens then 1: the
              numerical noise floor (kvshare's fills look like this to vLLM)
reference: vanilla vLLM's 64 greedy tokens for the later prompt, one-step prefill.
Each engine runs in its own child process, one after the other (~30-120 s to start).

example: kvshare bench quality --pairs 16 --rho 0.15 --sweep --json results/quality.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--pairs", type=int, default=16, metavar="N",
                        help="number of prompt pairs: half from the ShareGPT similar stream, "
                             "half paper-style edits of real prompts (default: 16, about "
                             "10 min on 2 CPU cores)")
    parser.add_argument("--rho", type=float, default=0.15, metavar="R",
                        help="kvshare's DHD recompute share in [0, 1] (default: 0.15)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for choosing and editing the edit pairs (default: 0)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated systems to run "
                             f"(default: all of {','.join(SYSTEMS)})")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also run kvshare at rho in {list(SWEEP_RHOS)} and plot ROUGE-L "
                             "against TTFT (one more set of requests on the kvshare engine)")
    add_prompt_length_arguments(parser, 64, 768)
    parser.add_argument("--min-reuse-fraction", type=float, default=0.0,
                        help="connector systems claim a plan reusing at least this share of "
                             "the prompt (default: 0.0: reuse whatever the planner finds, so "
                             "quality is measured on every pair)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--out", type=Path, default=Path("results/quality"),
                        help="directory for the markdown table, per-pair outputs and the sweep "
                             "plot (default: results/quality)")


# ------------------------------------------------------------------------ metrics
def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score, stemmed); identical texts agree perfectly, also when
    rouge-score's tokenizer finds no word in them (code, punctuation, CJK)."""
    from rouge_score import rouge_scorer

    if prediction == reference or not (prediction.strip() or reference.strip()):
        return 1.0
    return _scorer(rouge_scorer).score(reference, prediction)["rougeL"].fmeasure


_SCORER = None


def _scorer(module):
    global _SCORER
    if _SCORER is None:
        _SCORER = module.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def recompute_fraction(prompt_tokens: int, num_cached_tokens: int, report: dict | None) -> float:
    """Share of the prompt the model computed: vLLM's own part plus connector recompute.

    ``num_cached_tokens`` counts vLLM's prefix hit and the connector's claim; of the
    claim, the load report's ``recomputed`` tokens were computed by kvshare's engine.
    """
    if prompt_tokens <= 0:
        raise ValueError(f"prompt_tokens must be > 0, got {prompt_tokens}")
    computed = prompt_tokens - num_cached_tokens
    if report:
        computed += int(report.get("recomputed", 0))
    return min(1.0, max(0.0, computed / prompt_tokens))


@dataclass
class Outcome:
    """One system's answer to one later prompt."""

    output_ids: list[int]
    text: str
    recompute_fraction: float
    ttft_s: float | None = None
    claimed: bool = False
    first_logprob: float | None = None


def score(outcomes: Sequence[Outcome], references: Sequence[Outcome]) -> dict:
    """Mean metrics of ``outcomes`` against ``references`` (same order, same pairs)."""
    if len(outcomes) != len(references):
        raise ValueError(f"{len(outcomes)} outcomes for {len(references)} references")
    if not outcomes:
        return {key: None for key in METRIC_KEYS}
    n = len(outcomes)
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    # Drift of the first token's log-probability where both chose the same first token.
    drift = [abs(o.first_logprob - r.first_logprob) for o, r in zip(outcomes, references)
             if o.first_logprob is not None and r.first_logprob is not None
             and o.output_ids[:1] == r.output_ids[:1]]
    return {
        "rouge_l": sum(rouge_l(o.text, r.text) for o, r in zip(outcomes, references)) / n,
        "exact_match": sum(o.output_ids == r.output_ids for o, r in zip(outcomes, references)) / n,
        "first_token_agree": sum(bool(o.output_ids) and bool(r.output_ids)
                                 and o.output_ids[0] == r.output_ids[0]
                                 for o, r in zip(outcomes, references)) / n,
        "recompute_fraction": sum(o.recompute_fraction for o in outcomes) / n,
        "claimed_fraction": sum(o.claimed for o in outcomes) / n,
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "first_logprob_max_abs_diff": max(drift) if drift else None,
        "pairs": n,
    }


def unavailable(name: str, error: str) -> dict:
    """The JSON row of a system that could not run; metric keys stay, as null."""
    return {**{key: None for key in METRIC_KEYS}, "available": False, "error": error}


# ------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    systems = _parse_systems(args.systems)
    if args.pairs < 2:
        raise SystemExit(f"--pairs must be >= 2 (half similar, half edits), got {args.pairs}")
    if not 0.0 <= args.rho <= 1.0:
        raise SystemExit(f"--rho must be in [0, 1], got {args.rho}")
    if not 0.0 <= args.min_reuse_fraction <= 1.0:
        raise SystemExit(
            f"--min-reuse-fraction must be in [0, 1], got {args.min_reuse_fraction}")
    check_prompt_lengths(args)
    started = time.perf_counter()
    prepared = prepare_pairs(args)
    results = run_systems(prepared, systems, args)
    results["wall_s"] = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (args.out / "quality.md").write_text(table)
    (args.out / "quality_outputs.json").write_text(json.dumps(results.pop("outputs"), indent=1))
    if results.get("sweep"):
        plot_sweep(results, args.out / "quality_vs_ttft.png")
    print(table)
    print(f"table, per-pair outputs{' and sweep plot' if results.get('sweep') else ''} "
          f"written to {args.out}/")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"JSON written to {args.json}")
    return 0


def _parse_systems(value: str) -> list[str]:
    systems = [s.strip() for s in value.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        raise SystemExit(
            f"unknown system(s) {unknown or value!r}; choose from {', '.join(SYSTEMS)}")
    return systems


@dataclass
class PreparedPair:
    pair_id: str
    kind: str
    detail: str
    earlier_ids: list[int]
    later_ids: list[int]


def prepare_pairs(args: argparse.Namespace) -> list[PreparedPair]:
    """Real pairs (half similar stream, half edits), in chat-template token ids."""
    from kvshare.bench.pairs import edit_pairs, similar_pairs
    from kvshare.bench.workload import load_workload
    from kvshare.config import KVShareConfig
    from kvshare.matching.embedder import make_embedder
    from kvshare.model_assets import load_tokenizer

    config = KVShareConfig.load(args.config)
    tokenizer = load_tokenizer(config.model)
    embedder = make_embedder(config.embedder, config.embed_max_chars)
    workload = load_workload(config, embedder, tokenizer)
    stream = workload.similar_positions()
    n_similar = args.pairs // 2
    pairs = similar_pairs([workload.texts[p] for p in stream],
                          [workload.token_ids[p] for p in stream], workload.embeddings[stream],
                          n_similar, min_tokens=args.min_tokens, max_tokens=args.max_tokens)
    used = {text for pair in pairs for text in (pair.earlier, pair.later)}
    pairs += edit_pairs(workload.texts, [len(t) for t in workload.token_ids],
                        args.pairs - len(pairs), args.seed, min_tokens=args.min_tokens,
                        max_tokens=args.max_tokens, exclude=used)
    if len(pairs) < args.pairs:
        logger.warning("found only %d of %d pairs within %d..%d tokens", len(pairs), args.pairs,
                       args.min_tokens, args.max_tokens)
    return [PreparedPair(p.pair_id, p.kind, p.detail, chat_ids(tokenizer, p.earlier),
                         chat_ids(tokenizer, p.later)) for p in pairs]


def chat_ids(tokenizer, user_text: str) -> list[int]:
    """Token ids of ``user_text`` as a user turn in the model's chat template."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                         add_generation_prompt=True, tokenize=False)
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def split_filler(token: int, budget: int, prompt_tokens: int) -> list[int]:
    """A filler prompt that makes vLLM prefill a ``prompt_tokens`` request as N-1, then 1.

    The filler is queued first. vLLM's EngineCore runs in its own process and may start a
    step before the request arrives, so the filler is two steps long: it takes the whole
    first step (``budget`` tokens) whether or not the request is already queued, and in
    the second it leaves exactly ``prompt_tokens - 1`` of the budget to the request; the
    request's last token is then prefilled in the third step, alone (the filler finishes
    with one output token).
    """
    if not 2 <= prompt_tokens <= budget:
        raise ValueError(f"need 2 <= prompt_tokens <= budget, got {prompt_tokens} and {budget}")
    return [token] * (2 * budget - (prompt_tokens - 1))


def connector_config(system: str, rho: float, home: str, min_reuse_fraction: float) -> dict:
    """``kv_connector_extra_config`` of a connector system."""
    base = {"home": home, "min_reuse_fraction": min_reuse_fraction, "min_reuse_tokens": 1}
    if system == "kvshare":
        return {**base, "rho": rho}
    if system == "naive":
        return {**base, "rho": 0.0, "check_layers": []}
    if system == "cacheblend":
        return {**base, "rho": CACHEBLEND_RHO, "planner": "chunk256"}
    raise ValueError(f"{system!r} is not a connector system; choose from {CONNECTOR_SYSTEMS}")


def run_systems(pairs: list[PreparedPair], systems: list[str], args) -> dict:
    from kvshare.bench.vllm_runner import EngineSpec, EngineUnavailable, Req, run_engine
    from kvshare.config import KVShareConfig
    from kvshare.model_assets import resolve_model_dir

    config = KVShareConfig.load(args.config)
    model_dir = str(resolve_model_dir(config.model, config.home_dir))
    longest = max(len(p.later_ids) for p in pairs)
    # One step holds the longest later prompt; the split filler spans two steps.
    budget = longest + 1
    spec_kwargs = dict(model_dir=model_dir, max_num_batched_tokens=budget,
                       max_model_len=max(2048, 2 * budget + MAX_TOKENS))
    filler_token = pairs[0].earlier_ids[-2]

    # Vanilla engine: reference, gptcache, prefix and split in one start.
    vanilla: list[Req] = []
    for p in pairs:
        vanilla.append(Req(f"ref/{p.pair_id}", p.later_ids, MAX_TOKENS, salt=f"ref/{p.pair_id}"))
        if "gptcache" in systems or "prefix" in systems:
            # The earlier prompt's full answer is GPTCache's stale answer; sent under the
            # prefix system's salt, it also fills the prefix cache for the later prompt.
            vanilla.append(Req(f"earlier/{p.pair_id}", p.earlier_ids,
                               MAX_TOKENS if "gptcache" in systems else 1,
                               salt=f"prefix/{p.pair_id}"))
        if "prefix" in systems:
            vanilla.append(Req(f"prefix/{p.pair_id}", p.later_ids, MAX_TOKENS,
                               salt=f"prefix/{p.pair_id}"))
        if "split" in systems:
            vanilla.append(Req(f"split/{p.pair_id}", p.later_ids, MAX_TOKENS,
                               salt=f"split/{p.pair_id}",
                               filler_ids=split_filler(filler_token, budget, len(p.later_ids))))
    print(f"quality: {len(pairs)} pairs, systems {', '.join(systems)}; vanilla engine "
          f"({len(vanilla)} requests)")
    done = {r.req_id: r for r in run_engine(EngineSpec("vanilla", **spec_kwargs), vanilla)}

    def outcome(result, prompt_len: int, fraction: float | None = None) -> Outcome:
        frac = (recompute_fraction(prompt_len, result.num_cached_tokens, result.kvshare)
                if fraction is None else fraction)
        return Outcome(result.output_ids, result.text, frac, result.ttft_s,
                       claimed=bool(result.kvshare), first_logprob=result.first_logprob)

    refs = [outcome(done[f"ref/{p.pair_id}"], len(p.later_ids)) for p in pairs]
    per_system: dict[str, list[Outcome]] = {}
    if "gptcache" in systems:
        per_system["gptcache"] = [outcome(done[f"earlier/{p.pair_id}"], len(p.earlier_ids), 0.0)
                                  for p in pairs]
        for o in per_system["gptcache"]:
            o.ttft_s = None  # a response cache answers without the model
    for name in ("prefix", "split"):
        if name in systems:
            per_system[name] = [outcome(done[f"{name}/{p.pair_id}"], len(p.later_ids))
                                for p in pairs]

    rows: dict[str, dict] = {}
    sweep: dict[str, dict] = {}
    for name in [s for s in systems if s in CONNECTOR_SYSTEMS]:
        rhos = [args.rho] + ([r for r in SWEEP_RHOS if r != args.rho]
                             if args.sweep and name == "kvshare" else [])
        requests: list[Req] = []
        for rho in rhos:
            for p in pairs:
                salt = f"{name}/{rho}/{p.pair_id}"
                requests += [Req(f"earlier/{salt}", p.earlier_ids, 1, salt=salt, rho=rho),
                             Req(f"later/{salt}", p.later_ids, MAX_TOKENS, salt=salt, rho=rho)]
        with tempfile.TemporaryDirectory(prefix=f"kvshare-quality-{name}-") as home:
            spec = EngineSpec(name, connector=connector_config(
                name, args.rho, home, args.min_reuse_fraction), **spec_kwargs)
            try:
                results = {r.req_id: r for r in run_engine(spec, requests)}
            except EngineUnavailable as exc:
                rows[name] = unavailable(name, f"connector not available: {exc}")
                print(f"{name}: connector not available: {exc}")
                continue
        for rho in rhos:
            outs = [outcome(results[f"later/{name}/{rho}/{p.pair_id}"], len(p.later_ids))
                    for p in pairs]
            if rho == args.rho:
                per_system[name] = outs
            if name == "kvshare" and args.sweep:
                sweep[f"{rho:g}"] = {"rho": rho, **score(outs, refs)}
                per_system[f"kvshare@rho={rho:g}"] = outs
                if "split" in per_system:  # same prefill split: rho = 1 must match exactly
                    vs_split = score(outs, per_system["split"])
                    sweep[f"{rho:g}"].update(exact_match_vs_split=vs_split["exact_match"],
                                             rouge_l_vs_split=vs_split["rouge_l"])

    for name in systems:
        if name in per_system:
            rows[name] = {**score(per_system[name], refs), "available": True}
            if "split" in per_system:  # kvshare's own error, without vLLM's split noise
                rows[name]["rouge_l_vs_split"] = score(per_system[name],
                                                       per_system["split"])["rouge_l"]
    ref_ttft = [r.ttft_s for r in refs]
    return {
        "pairs": len(pairs),
        "pair_kinds": {k: sum(p.kind.startswith(k) for p in pairs) for k in ("similar", "edit")},
        "rho": args.rho,
        "seed": args.seed,
        "max_new_tokens": MAX_TOKENS,
        "reference_ttft_median_s": statistics.median(ref_ttft),
        "systems": {name: rows[name] for name in systems if name in rows},
        "sweep": sweep,
        "outputs": {
            p.pair_id: {"kind": p.kind, "detail": p.detail, "reference": refs[i].text,
                        "reference_first_logprob": refs[i].first_logprob,
                        **{name: outs[i].text for name, outs in per_system.items()},
                        **{f"{name}_first_logprob": outs[i].first_logprob
                           for name, outs in per_system.items()}}
            for i, p in enumerate(pairs)
        },
    }


# ------------------------------------------------------------------------ report
def markdown_table(results: dict) -> str:
    kinds = results.get("pair_kinds", {})
    lines = [
        f"### Quality vs full compute: {results['pairs']} pairs "
        f"({kinds.get('similar', 0)} similar-stream, {kinds.get('edit', 0)} edits), "
        f"{results['max_new_tokens']} greedy tokens, kvshare rho={results['rho']:g}\n",
        "| system | ROUGE-L | exact match | first token | recomputed | TTFT p50 | claimed "
        "| ROUGE-L vs split |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["systems"].items():
        if not row.get("available", True):
            lines.append(f"| {name} | - | - | - | - | - | {row['error']} | - |")
            continue
        ttft = f"{row['ttft_median_s'] * 1000:.0f} ms" if row.get("ttft_median_s") else "-"
        claimed = f"{row['claimed_fraction']:.0%}" if name in CONNECTOR_SYSTEMS else ""
        lines.append(f"| {name} | {_bar(row['rouge_l'])} | {row['exact_match']:.0%} | "
                     f"{row['first_token_agree']:.0%} | {row['recompute_fraction']:.1%} | "
                     f"{ttft} | {claimed} | {format_or_dash(row.get('rouge_l_vs_split'), '.3f')} |")
    lines.append(f"\nreference (vanilla, one-step prefill) TTFT p50: "
                 f"{results['reference_ttft_median_s'] * 1000:.0f} ms")
    if results.get("sweep"):
        lines += ["",
                  "| kvshare rho | ROUGE-L | exact match | first token | recomputed | TTFT p50 "
                  "| = split | ROUGE-L vs split |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in sorted(results["sweep"].values(), key=lambda r: r["rho"]):
            lines.append(f"| {row['rho']:g} | {_bar(row['rouge_l'])} | {row['exact_match']:.0%} | "
                         f"{row['first_token_agree']:.0%} | {row['recompute_fraction']:.1%} | "
                         f"{row['ttft_median_s'] * 1000:.0f} ms | "
                         f"{format_or_dash(row.get('exact_match_vs_split'), '.0%')} | "
                         f"{format_or_dash(row.get('rouge_l_vs_split'), '.3f')} |")
        lines.append("\n= split: share of pairs whose 64 tokens equal vanilla vLLM's under the "
                     "same N-1/1 prefill split (rho = 1 must be 100%)")
    return "\n".join(lines) + "\n"


def format_or_dash(value: float | None, spec: str, suffix: str = "", scale: float = 1.0
                   ) -> str:
    """A table cell: ``value * scale`` formatted with ``spec`` and ``suffix``, or "-"."""
    return "-" if value is None else format(value * scale, spec) + suffix


def _bar(value: float, width: int = 10) -> str:
    """``0.873 █████████░`` : the number with a bar, readable in a terminal and in markdown."""
    filled = round(max(0.0, min(1.0, value)) * width)
    return f"{value:.3f} {'█' * filled}{'░' * (width - filled)}"


def plot_sweep(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    sweep = sorted(results["sweep"].values(), key=lambda r: r["rho"])
    xs = [r["ttft_median_s"] * 1000 for r in sweep]
    ys = [r["rouge_l"] for r in sweep]
    ax.plot(xs, ys, "o-", label="kvshare (DHD)")
    for r, x, y in zip(sweep, xs, ys):
        ax.annotate(f"rho={r['rho']:g}", (x, y), textcoords="offset points", xytext=(5, -10),
                    fontsize=8)
    for name, row in results["systems"].items():
        # split's TTFT includes its filler's two prefill steps: not a time to plot.
        if (name not in ("kvshare", "split") and row.get("available", True)
                and row.get("ttft_median_s")):
            ax.plot(row["ttft_median_s"] * 1000, row["rouge_l"], "s", label=name)
    ax.axvline(results["reference_ttft_median_s"] * 1000, color="grey", linestyle="--",
               label="vanilla TTFT (reference)")
    ax.set_xlabel("median TTFT of the later prompt (ms)")
    ax.set_ylabel("mean ROUGE-L F1 vs full compute")
    ax.set_title(f"Quality vs TTFT, {results['pairs']} pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
