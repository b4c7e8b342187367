"""``kvshare bench quality``: how close reused-KV answers stay to full compute.

Pairs (earlier prompt, similar later prompt) of real ShareGPT user turns, drawn by
``--seed`` (see :mod:`kvshare.bench.pairs`), are wrapped in the model's chat template.
For every system the earlier prompt is sent first (so it is cached), then the later one.
The *reference* is vanilla vLLM on the later prompt, prefilled in one step.

Two measurements per system and pair:

* greedy: the later prompt's 64 greedy tokens against the reference's 64 (ROUGE-L F1,
  exact match, first token). One flipped token changes everything after it, so on a 135M
  model these scores are noisy;
* teacher-forced (:mod:`kvshare.bench.teacher_forcing`): the later prompt followed by the
  reference's 64 tokens, each system scoring its next-token distribution at every one of
  those positions against the reference's (mean KL(full || system) per token, top-1
  agreement). This request has its own ``cache_salt``, with the earlier prompt sent again
  first, so it sees the same caches as the greedy request; the connector is told the
  real prompt's length and claims as for it (the JSON counts pairs where the two claims
  differ).

Systems (each pair gets its own ``cache_salt``, so pairs never reuse each other):

* ``kvshare``: the connector as configured (``--config``, ``--set``; ``--rho``).
* ``kvshare_tailkv``: the same with ``recompute_tail_by: kvshare`` (the fill recomputes
  the prompt's tail instead of leaving it to vLLM).
* ``naive``: the connector recomputing only placeholders and boundaries
  (``check_layers=[]``, rho 0).
* ``cacheblend``: the connector with the ``chunk256`` planner (exact 256-token chunks at
  any position, LMCache/CacheBlend style) and 15% deviation recompute.
* ``gptcache``: the earlier prompt's vanilla answer, returned as is (greedy only).
* ``prefix``: vanilla vLLM with prefix caching, earlier prompt sent first.
* ``split``: vanilla vLLM prefilling the later prompt as N-1 tokens, then the last one:
  what a fill to the last token (``recompute_tail_by: kvshare``) looks like to vLLM.
* ``split_tail``: vanilla vLLM prefilling the first N-1-``recompute_tail_tokens``
  tokens, then the rest: what a fill that leaves the tail to vLLM looks like.
  The splits are vLLM's own numerical noise floor for the matching connector systems.

Every connector system's config is the YAML base with its own overrides on top, passed
to its engine in full and recorded in the JSON (:mod:`kvshare.bench.engine_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvshare.bench.engine_config import add_config_arguments
from kvshare.bench.reuse import RequestReuse
from kvshare.bench.teacher_forcing import PositionScore, Row, summarize
from kvshare.bench.workload import add_prompt_length_arguments, check_prompt_lengths

if TYPE_CHECKING:
    from kvshare.bench.vllm_runner import Req, Result
    from kvshare.config import KVShareConfig

logger = logging.getLogger(__name__)

SYSTEMS = ("kvshare", "kvshare_tailkv", "kvshare_adaptive", "naive", "cacheblend", "gptcache",
           "prefix", "split", "split_tail")
DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if s not in ("kvshare_tailkv", "kvshare_adaptive"))
CONNECTOR_SYSTEMS = ("kvshare", "kvshare_tailkv", "kvshare_adaptive", "naive", "cacheblend")
DEFAULT_RHO_MASS = 0.5
"""``rho_mass`` of ``kvshare_adaptive`` when the config leaves the budget fixed."""
SPLIT_SYSTEMS = ("split", "split_tail")
SWEEP_RHOS = (0.0, 0.05, 0.1, 0.15, 0.3, 1.0)
CACHEBLEND_RHO = 0.15
MAX_TOKENS = 64
REFERENCE_TOP_K = 500
"""Full compute's most likely tokens per forced position that KL is measured over (plus
one rest bucket). On SmolLM2-135M they hold about 97% of the probability on average
(93-99% per prompt on the first pairs; 100 tokens: 83-97%)."""
SYSTEM_TOP_K = 1000
"""How deep vLLM ranks each system's tokens to find the reference's top tokens among them
(a reference token outside them counts in the rest bucket, on both sides)."""
CHECK_PAIRS = 2
"""Pairs on which vanilla vLLM is scored against itself (must give KL 0 and top-1 100%)."""
METRIC_KEYS = ("rouge_l", "exact_match", "first_token_agree", "recompute_fraction",
               "kl_mean", "top1_agree", "fallbacks")


EPILOG = """\
systems (each pair has its own cache_salt, so pairs never reuse each other):
  kvshare         the connector as configured (--config, --set, --rho)
  kvshare_tailkv  the same with recompute_tail_by=kvshare (not run by default)
  kvshare_adaptive  the same with the adaptive DHD budget (--adaptive; not run by default)
  naive           the connector recomputing only placeholders and boundaries
  cacheblend      the connector, exact 256-token chunks at any position + 15% recompute
  gptcache        the earlier prompt's answer, returned as is
  prefix          vanilla vLLM with prefix caching (earlier prompt sent first)
  split           vanilla vLLM prefilling the later prompt as N-1 tokens, then 1
  split_tail      vanilla vLLM prefilling N-1-recompute_tail_tokens tokens, then the rest
reference: vanilla vLLM on the later prompt, one-step prefill.
greedy: 64 greedy tokens vs the reference's (ROUGE-L, exact match, first token).
teacher-forced: the reference's 64 tokens appended to the prompt; per position
KL(full || system) over the reference's top tokens + a rest bucket, and top-1 agreement.
Each engine runs in its own child process, one after the other (~30-120 s to start).

protocol: choose defaults on tuning seeds, report on a held-out one:
  kvshare bench quality --pairs 40 --seed 1 ...   and --seed 2 (tuning)
  kvshare bench quality --pairs 40 --seed 7 --exclude-seeds 1,2 --sweep \\
      --json results/quality.json                  (held out, the figures)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--pairs", type=int, default=16, metavar="N",
                        help="number of prompt pairs: half from the ShareGPT similar stream, "
                             "half paper-style edits of real prompts (default: 16)")
    parser.add_argument("--rho", type=float, default=None, metavar="R",
                        help="kvshare's DHD recompute share in [0, 1] (default: the config's "
                             "rho)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed that draws the pairs (both kinds) and the edits "
                             "(default: 0)")
    parser.add_argument("--exclude-seeds", default="", metavar="S,S",
                        help="leave out every prompt of the pairs these seeds draw (with the "
                             "same --pairs): the tuning seeds, when reporting on a held-out "
                             "one")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated systems to run, from {','.join(SYSTEMS)} "
                             f"(default: {','.join(DEFAULT_SYSTEMS)})")
    parser.add_argument("--adaptive", type=float, nargs="?", const=-1.0, metavar="MASS",
                        help="also run kvshare_adaptive: the connector recomputing, per "
                             "request, the reused tokens that cover MASS of the deviation, "
                             "between the config's rho_min and rho_max (MASS: the config's "
                             f"rho_mass, else {DEFAULT_RHO_MASS})")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also run kvshare at rho in {list(SWEEP_RHOS)} and plot quality "
                             "against TTFT (more requests on the kvshare engine)")
    add_prompt_length_arguments(parser, 64, 768)
    parser.add_argument("--min-reuse-fraction", type=float, default=0.0,
                        help="connector systems claim a plan reusing at least this share of "
                             "the prompt (default: 0.0: reuse whatever the planner finds, so "
                             "quality is measured on every pair)")
    add_config_arguments(parser)
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


@dataclass
class Outcome:
    """One system on one later prompt: its greedy answer and, when measured, its scores
    on the teacher-forced continuation."""

    output_ids: list[int]
    text: str
    reuse: RequestReuse | None
    """What the greedy request reused; None for gptcache (no model ran)."""
    ttft_s: float | None = None
    first_logprob: float | None = None
    forced: list[PositionScore] | None = None
    """Teacher-forced scores, one per continuation position (None: not measured)."""
    forced_reuse: RequestReuse | None = None
    """What the teacher-forced request reused (its prompt includes the continuation)."""

    @property
    def fallbacks(self) -> int:
        """Requests of this outcome whose selective fill fell back to full recompute."""
        return sum(bool(r and r.fallback) for r in (self.reuse, self.forced_reuse))

    @property
    def claim_differs(self) -> bool:
        """The teacher-forced request was claimed differently from the greedy one."""
        return (self.forced_reuse is not None and self.reuse is not None
                and self.forced_reuse.claimed != self.reuse.claimed)


def score(outcomes: Sequence[Outcome], references: Sequence[Outcome]) -> dict:
    """Mean metrics of ``outcomes`` against ``references`` (same order, same pairs).

    ``recompute_fraction``: prompt tokens the model computed (vLLM or kvshare), i.e. 1 -
    reused share, where reused = vLLM's prefix hit + claimed tokens loaded and not
    recomputed (gptcache: 0, no model ran). Teacher-forced keys are None unless every
    outcome was teacher-forced.
    """
    if len(outcomes) != len(references):
        raise ValueError(f"{len(outcomes)} outcomes for {len(references)} references")
    if not outcomes:
        return {key: None for key in METRIC_KEYS}
    n = len(outcomes)
    pairs = list(zip(outcomes, references))
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    # Drift of the first token's log-probability where both chose the same first token.
    drift = [abs(o.first_logprob - r.first_logprob) for o, r in pairs
             if o.first_logprob is not None and r.first_logprob is not None
             and o.output_ids[:1] == r.output_ids[:1]]
    reuses = [o.reuse for o in outcomes]
    forced = (summarize(s for o in outcomes for s in o.forced)
              if all(o.forced is not None for o in outcomes) else None)
    return {
        "rouge_l": sum(rouge_l(o.text, r.text) for o, r in pairs) / n,
        "exact_match": sum(o.output_ids == r.output_ids for o, r in pairs) / n,
        "first_token_agree": sum(bool(o.output_ids) and bool(r.output_ids)
                                 and o.output_ids[0] == r.output_ids[0] for o, r in pairs) / n,
        "kl_mean": forced.kl_mean if forced else None,
        "top1_agree": forced.top1_agree if forced else None,
        "kl_rest_mass": forced.rest_mass_mean if forced else None,
        "forced_positions": forced.positions if forced else 0,
        "recompute_fraction": sum(r.computed_fraction if r else 0.0 for r in reuses) / n,
        "reused_fraction": (sum(r.reused_fraction for r in reuses) / n
                            if all(reuses) else None),
        "claimed_fraction": sum(bool(r and r.claimed) for r in reuses) / n,
        "fallbacks": sum(o.fallbacks for o in outcomes),
        "requests": sum((o.reuse is not None) + (o.forced_reuse is not None) for o in outcomes),
        "forced_claim_mismatches": sum(o.claim_differs for o in outcomes),
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "first_logprob_max_abs_diff": max(drift) if drift else None,
        "pairs": n,
    }


def unavailable(name: str, error: str) -> dict:
    """The JSON row of a system that could not run; metric keys stay, as null."""
    return {**{key: None for key in METRIC_KEYS}, "available": False, "error": error}


# ------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    from kvshare.bench.engine_config import base_config, ignored_environment

    systems = _parse_systems(args.systems)
    if args.adaptive is not None and "kvshare_adaptive" not in systems:
        systems.append("kvshare_adaptive")
    if args.adaptive is not None and args.adaptive != -1.0 and not 0.0 < args.adaptive <= 1.0:
        raise SystemExit(f"--adaptive MASS must be in (0, 1], got {args.adaptive}")
    if args.pairs < 2:
        raise SystemExit(f"--pairs must be >= 2 (half similar, half edits), got {args.pairs}")
    if args.rho is not None and not 0.0 <= args.rho <= 1.0:
        raise SystemExit(f"--rho must be in [0, 1], got {args.rho}")
    if not 0.0 <= args.min_reuse_fraction <= 1.0:
        raise SystemExit(
            f"--min-reuse-fraction must be in [0, 1], got {args.min_reuse_fraction}")
    excluded = excluded_seeds(args)
    check_prompt_lengths(args)
    base = base_config(args.config, args.sets)
    ignored = ignored_environment()
    if ignored:
        print(f"quality: ignoring {', '.join(ignored)} (systems take their config from "
              "--config and --set only)")
    started = time.perf_counter()
    prepared = prepare_pairs(args, base, excluded)
    results = run_systems(prepared, systems, args, base)
    results["excluded_seeds"] = excluded
    results["ignored_environment"] = ignored
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


def excluded_seeds(args: argparse.Namespace) -> list[int]:
    """``--exclude-seeds`` as integers; ``--seed`` must not be among them (held out)."""
    try:
        excluded = [int(part) for part in args.exclude_seeds.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--exclude-seeds expects integers separated by commas, got "
                         f"{args.exclude_seeds!r}") from None
    if args.seed in excluded:
        raise SystemExit(f"--seed {args.seed} is also in --exclude-seeds {args.exclude_seeds}")
    return excluded


@dataclass
class PreparedPair:
    pair_id: str
    kind: str
    detail: str
    earlier_ids: list[int]
    later_ids: list[int]


def prepare_pairs(args: argparse.Namespace, config: KVShareConfig,
                  excluded_seeds: Sequence[int] = ()) -> list[PreparedPair]:
    """Real pairs drawn by ``args.seed`` (half similar stream, half edits), in
    chat-template token ids; no prompt of the pairs ``excluded_seeds`` draw."""
    from kvshare.bench.pairs import Pair, draw, edit_pairs, similar_pairs
    from kvshare.bench.workload import load_workload
    from kvshare.matching.embedder import make_embedder
    from kvshare.model_assets import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    embedder = make_embedder(config.embedder, config.embed_max_chars)
    workload = load_workload(config, embedder, tokenizer)
    stream = workload.similar_positions()
    candidates = similar_pairs([workload.texts[p] for p in stream],
                               [workload.token_ids[p] for p in stream],
                               workload.embeddings[stream], len(stream),
                               min_tokens=args.min_tokens, max_tokens=args.max_tokens)
    counts = [len(t) for t in workload.token_ids]

    def pairs_of(seed: int, exclude: set[str]) -> list[Pair]:
        pairs = draw(candidates, args.pairs // 2, seed, exclude)
        used = exclude | {text for pair in pairs for text in (pair.earlier, pair.later)}
        return pairs + edit_pairs(workload.texts, counts, args.pairs - len(pairs), seed,
                                  min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                                  exclude=used)

    excluded = {text for seed in excluded_seeds for pair in pairs_of(seed, set())
                for text in (pair.earlier, pair.later)}
    pairs = pairs_of(args.seed, excluded)
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


def split_filler(token: int, budget: int, head_tokens: int) -> list[int]:
    """A filler prompt that makes vLLM prefill a request's first ``head_tokens`` tokens in
    one step and the rest of it in the next.

    The filler is queued first. vLLM's EngineCore runs in its own process and may start a
    step before the request arrives, so the filler is two steps long: it takes the whole
    first step (``budget`` tokens) whether or not the request is already queued, and in
    the second it leaves exactly ``head_tokens`` of the budget to the request; the rest
    of the request (at most ``budget`` tokens) is prefilled in the third step, alone (the
    filler finishes with one output token).
    """
    if not 1 <= head_tokens < budget:
        raise ValueError(f"need 1 <= head_tokens < budget, got {head_tokens} and {budget}")
    return [token] * (2 * budget - head_tokens)


def split_heads(config: KVShareConfig) -> dict[str, Callable[[int], int]]:
    """Tokens the first step of each split system prefills, for an N-token prompt: where
    the connector's claim would end with the tail computed by kvshare (``split``: N-1) or
    by vLLM (``split_tail``), by the one claim rule."""
    from kvshare.matching.claim import claim_end

    by_kvshare = dataclasses.replace(config, recompute_tail_by="kvshare")
    by_vllm = dataclasses.replace(config, recompute_tail_by="vllm")
    return {"split": lambda n: claim_end(n, by_kvshare),
            "split_tail": lambda n: claim_end(n, by_vllm)}


def matching_split(connector: dict[str, Any]) -> str:
    """The vanilla split whose prefill cut is the one a connector system's fills have."""
    return "split" if connector["recompute_tail_by"] == "kvshare" else "split_tail"


def connector_overrides(system: str, rho: float | None, home: str,
                        min_reuse_fraction: float, rho_mass: float | None = None
                        ) -> dict[str, Any]:
    """What a connector system sets on top of the base config (``rho_mass``: the adaptive
    system's, None for the config's or ``DEFAULT_RHO_MASS``)."""
    bench = {"home": home, "min_reuse_fraction": min_reuse_fraction, "min_reuse_tokens": 1}
    own = {"rho": rho} if rho is not None else {}
    if system == "kvshare":
        return {**bench, **own}
    if system == "kvshare_tailkv":
        return {**bench, **own, "recompute_tail_by": "kvshare"}
    if system == "kvshare_adaptive":
        return {**bench, **({"rho_mass": rho_mass} if rho_mass is not None else {})}
    if system == "naive":
        return {**bench, "rho": 0.0, "check_layers": []}
    if system == "cacheblend":
        return {**bench, "rho": CACHEBLEND_RHO, "planner": "chunk256"}
    raise ValueError(f"{system!r} is not a connector system; choose from {CONNECTOR_SYSTEMS}")


def _key(system: str, pair_id: str, rho: float | None = None) -> str:
    return f"{system}/{pair_id}" if rho is None else f"{system}/{rho:g}/{pair_id}"


def _forced_req(key: str, prompt: list[int], pair_id: str, **kwargs) -> Req:
    """The teacher-forced request of ``key``: the reference's continuation appended, scored
    against the reference's rows, in its own cache scope."""
    from kvshare.bench.vllm_runner import Req

    return Req(f"tf/{key}", prompt, 1, salt=f"tf/{key}", forced_from=f"later/ref/{pair_id}",
               top_k=SYSTEM_TOP_K, reference_from=f"tf/ref/{pair_id}", **kwargs)


def vanilla_requests(pairs: Sequence[PreparedPair], systems: Sequence[str], budget: int,
                     heads: dict[str, Callable[[int], int]], filler_token: int) -> list[Req]:
    """Requests of the vanilla engine: warm-up, the reference (greedy, then its
    teacher-forced rows), the self-check, and the vanilla systems, each greedy and
    teacher-forced."""
    from kvshare.bench.vllm_runner import Req, warmup_requests

    requests: list[Req] = warmup_requests(pairs[0].later_ids) if pairs else []
    for i, p in enumerate(pairs):
        ref = _key("ref", p.pair_id)
        requests += [
            Req(f"later/{ref}", p.later_ids, MAX_TOKENS, salt=ref),
            Req(f"tf/{ref}", p.later_ids, 1, salt=f"tf/{ref}", forced_from=f"later/{ref}",
                top_k=REFERENCE_TOP_K)]
        if i < CHECK_PAIRS:
            requests.append(_forced_req(_key("vanilla", p.pair_id), p.later_ids, p.pair_id))
        if "gptcache" in systems or "prefix" in systems:
            # The earlier prompt's full answer is GPTCache's stale answer; sent under the
            # prefix system's salt, it also fills the prefix cache for the later prompt.
            key = _key("prefix", p.pair_id)
            requests.append(Req(f"earlier/{key}", p.earlier_ids,
                                MAX_TOKENS if "gptcache" in systems else 1, salt=key))
        if "prefix" in systems:
            key = _key("prefix", p.pair_id)
            requests += [Req(f"later/{key}", p.later_ids, MAX_TOKENS, salt=key),
                         Req(f"earlier/tf/{key}", p.earlier_ids, 1, salt=f"tf/{key}"),
                         _forced_req(key, p.later_ids, p.pair_id)]
        for name in SPLIT_SYSTEMS:
            if name in systems:
                key = _key(name, p.pair_id)
                head = heads[name](len(p.later_ids))
                # A prompt too short to claim anything is prefilled in one step, as with
                # the connector.
                filler = split_filler(filler_token, budget, head) if head else None
                requests += [Req(f"later/{key}", p.later_ids, MAX_TOKENS, salt=key,
                                 filler_ids=filler),
                             _forced_req(key, p.later_ids, p.pair_id, filler_ids=filler)]
    return requests


def connector_requests(pairs: Sequence[PreparedPair], name: str, rhos: Sequence[float | None]
                       ) -> list[Req]:
    """Requests of a connector engine: warm-up, then per rho (None: the config's) and
    pair, the earlier prompt then the later one greedy, and again in a second scope with
    the later one teacher-forced."""
    from kvshare.bench.vllm_runner import Req, warmup_requests

    requests: list[Req] = warmup_requests(pairs[0].later_ids) if pairs else []
    for rho in rhos:
        for p in pairs:
            key = _key(name, p.pair_id, rho)
            requests += [Req(f"earlier/{key}", p.earlier_ids, 1, salt=key, rho=rho),
                         Req(f"later/{key}", p.later_ids, MAX_TOKENS, salt=key, rho=rho),
                         Req(f"earlier/tf/{key}", p.earlier_ids, 1, salt=f"tf/{key}", rho=rho),
                         _forced_req(key, p.later_ids, p.pair_id, rho=rho)]
    return requests


def outcome(results: dict[str, Result], key: str, pair: PreparedPair,
            teacher_forced: bool = True) -> Outcome:
    """The outcome of ``key``'s later request and, with ``teacher_forced``, of its
    teacher-forced twin (scored against the reference)."""
    later = results[f"later/{key}"]
    forced = results[f"tf/{key}"] if teacher_forced else None
    return Outcome(
        later.output_ids, later.text,
        RequestReuse.of(len(pair.later_ids), later.num_cached_tokens, later.kvshare),
        later.ttft_s, later.first_logprob,
        forced=None if forced is None else [PositionScore(**s) for s in forced.forced_scores],
        forced_reuse=None if forced is None else RequestReuse.of(
            len(pair.later_ids) + len(forced.forced_scores), forced.num_cached_tokens,
            forced.kvshare))


def run_systems(pairs: list[PreparedPair], systems: list[str], args: argparse.Namespace,
                base: KVShareConfig) -> dict:
    from kvshare.bench.engine_config import connector_config
    from kvshare.bench.vllm_runner import EngineSpec, EngineUnavailable, run_engine
    from kvshare.model_assets import resolve_model_dir

    model_dir = str(resolve_model_dir(base.model, base.home_dir))
    # One step holds the longest later prompt with its forced continuation; the split
    # fillers span two steps.
    budget = max(len(p.later_ids) for p in pairs) + MAX_TOKENS + 1
    spec_kwargs = dict(model_dir=model_dir, max_num_batched_tokens=budget,
                       max_model_len=max(2048, 2 * budget + MAX_TOKENS),
                       max_logprobs=SYSTEM_TOP_K)
    vanilla = vanilla_requests(pairs, systems, budget, split_heads(base),
                               filler_token=pairs[0].earlier_ids[-2])
    print(f"quality: {len(pairs)} pairs, seed {args.seed}, systems {', '.join(systems)}; "
          f"vanilla engine ({len(vanilla)} requests)")
    done = {r.req_id: r for r in run_engine(EngineSpec("vanilla", **spec_kwargs), vanilla)}

    refs = [outcome(done, _key("ref", p.pair_id), p, teacher_forced=False) for p in pairs]
    reference_rows = [Row.of(ids, values) for p in pairs
                      for ids, values in zip(done[f"tf/ref/{p.pair_id}"].forced_ids,
                                             done[f"tf/ref/{p.pair_id}"].forced_logprobs)]
    check = summarize(PositionScore(**s) for p in pairs[:CHECK_PAIRS]
                      for s in done[f"tf/vanilla/{p.pair_id}"].forced_scores)
    per_system: dict[str, list[Outcome]] = {}
    configs: dict[str, dict | None] = {}
    if "gptcache" in systems:
        earlier = [done[f"earlier/{_key('prefix', p.pair_id)}"] for p in pairs]
        per_system["gptcache"] = [Outcome(r.output_ids, r.text, None, None, r.first_logprob)
                                  for r in earlier]  # a response cache answers without the model
    for name in ("prefix", *SPLIT_SYSTEMS):
        if name in systems:
            per_system[name] = [outcome(done, _key(name, p.pair_id), p) for p in pairs]

    rows: dict[str, dict] = {}
    sweep: dict[str, dict] = {}
    rho_mass = (args.adaptive if args.adaptive not in (None, -1.0)
                else base.rho_mass or DEFAULT_RHO_MASS)
    for name in [s for s in systems if s in CONNECTOR_SYSTEMS]:
        sweeping = args.sweep and name == "kvshare"
        with tempfile.TemporaryDirectory(prefix=f"kvshare-quality-{name}-") as home:
            config = connector_config(base, **connector_overrides(
                name, args.rho, home, args.min_reuse_fraction, rho_mass))
            rhos = [None] + ([r for r in SWEEP_RHOS if r != config["rho"]] if sweeping else [])
            known = [done[f"{kind}/ref/{p.pair_id}"] for p in pairs for kind in ("later", "tf")]
            try:
                results = {r.req_id: r for r in run_engine(
                    EngineSpec(name, connector=config, **spec_kwargs),
                    connector_requests(pairs, name, rhos), known=known)}
            except EngineUnavailable as exc:
                rows[name] = {**unavailable(name, f"connector not available: {exc}"),
                              "config": {**config, "home": "(temporary)"}}
                print(f"{name}: connector not available: {exc}")
                continue
        configs[name] = {**config, "home": "(temporary)"}
        split = matching_split(config)
        for rho in rhos:
            outs = [outcome(results, _key(name, p.pair_id, rho), p) for p in pairs]
            rho_value = config["rho"] if rho is None else rho
            if rho is None:
                per_system[name] = outs
            if sweeping:
                sweep[f"{rho_value:g}"] = {"rho": rho_value, **score(outs, refs)}
                per_system[f"kvshare@rho={rho_value:g}"] = outs
                if split in per_system:  # same prefill split: rho = 1 must match exactly
                    vs_split = score(outs, per_system[split])
                    sweep[f"{rho_value:g}"].update(split_system=split,
                                                   exact_match_vs_split=vs_split["exact_match"],
                                                   rouge_l_vs_split=vs_split["rouge_l"])

    for name in systems:
        if name not in per_system:
            continue
        rows[name] = {**score(per_system[name], refs), "available": True,
                      "config": configs.get(name)}
        if name in configs and matching_split(configs[name]) in per_system:
            split = matching_split(configs[name])
            rows[name].update(split_system=split, rouge_l_vs_split=score(
                per_system[name], per_system[split])["rouge_l"])
    return {
        "pairs": len(pairs),
        "pair_kinds": {k: sum(p.kind.startswith(k) for p in pairs) for k in ("similar", "edit")},
        "seed": args.seed,
        "rho": configs["kvshare"]["rho"] if "kvshare" in configs else None,
        "max_new_tokens": MAX_TOKENS,
        "teacher_forcing": {
            "reference_top_k": REFERENCE_TOP_K, "system_top_k": SYSTEM_TOP_K,
            "reference_rest_mass": statistics.fmean(1.0 - row.mass for row in reference_rows),
            "positions": len(reference_rows),
            "vanilla_vs_vanilla": dataclasses.asdict(check) if check else None},
        "reference_ttft_median_s": statistics.median(r.ttft_s for r in refs),
        "systems": {name: rows[name] for name in systems if name in rows},
        "sweep": sweep,
        "outputs": {
            p.pair_id: {"kind": p.kind, "detail": p.detail, "reference": refs[i].text,
                        "reference_first_logprob": refs[i].first_logprob,
                        **{name: outs[i].text for name, outs in per_system.items()},
                        **{f"{name}_first_logprob": outs[i].first_logprob
                           for name, outs in per_system.items()},
                        **{f"{name}_kl_mean": summarize(outs[i].forced).kl_mean
                           for name, outs in per_system.items() if outs[i].forced},
                        **{f"{name}_claimed": [outs[i].reuse.claimed, outs[i].forced_reuse.claimed]
                           for name, outs in per_system.items()
                           if outs[i].reuse and outs[i].forced_reuse
                           and (outs[i].reuse.claimed or outs[i].forced_reuse.claimed)}}
            for i, p in enumerate(pairs)
        },
    }


# ------------------------------------------------------------------------ report
def markdown_table(results: dict) -> str:
    kinds = results.get("pair_kinds", {})
    forcing = results["teacher_forcing"]
    excluded = results.get("excluded_seeds") or []
    rho = results.get("rho")
    lines = [
        f"### Quality vs full compute: {results['pairs']} pairs "
        f"({kinds.get('similar', 0)} similar-stream, {kinds.get('edit', 0)} edits), seed "
        f"{results['seed']}"
        + (f" (pairs of seeds {', '.join(map(str, excluded))} left out)" if excluded else "")
        + f", {results['max_new_tokens']} tokens"
        + (f", kvshare rho={rho:g}" if rho is not None else "") + "\n",
        "| system | top-1 (forced) | KL (forced) | ROUGE-L | exact match | first token "
        "| recomputed | TTFT p50 | claimed | fallbacks | ROUGE-L vs split |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["systems"].items():
        if not row.get("available", True):
            lines.append(f"| {name} | - | - | - | - | - | - | - | {row['error']} | - | - |")
            continue
        connector = row.get("config") is not None
        vs_split = ("-" if row.get("rouge_l_vs_split") is None
                    else f"{row['rouge_l_vs_split']:.3f} ({row['split_system']})")
        lines.append(
            f"| {name} | {format_or_dash(row.get('top1_agree'), '.1%')} | "
            f"{format_or_dash(row.get('kl_mean'), '.4f')} | {_bar(row['rouge_l'])} | "
            f"{row['exact_match']:.0%} | {row['first_token_agree']:.0%} | "
            f"{row['recompute_fraction']:.1%} | "
            f"{format_or_dash(row.get('ttft_median_s'), '.0f', ' ms', scale=1000)} | "
            f"{format_or_dash(row['claimed_fraction'] if connector else None, '.0%')} | "
            f"{row['fallbacks'] if connector else '-'} | {vs_split} |")
    check = forcing.get("vanilla_vs_vanilla") or {}
    lines += [
        "",
        f"forced: the reference's {results['max_new_tokens']} greedy tokens appended to the "
        f"prompt; per position, top-1 = the system's most likely token is full compute's, "
        f"KL = KL(full || system) in nats over full compute's top {forcing['reference_top_k']} "
        f"tokens + one rest bucket (a lower bound of the full-vocabulary KL; the rest holds "
        f"{forcing['reference_rest_mass']:.1%} of full compute's probability on average); "
        f"{forcing['positions']} positions. Vanilla vs vanilla: KL "
        f"{format_or_dash(check.get('kl_mean'), '.4f')}, top-1 "
        f"{format_or_dash(check.get('top1_agree'), '.0%')}.",
        "recomputed: prompt tokens computed by vLLM or kvshare = 1 - reused, where reused = "
        "vLLM's prefix hit + claimed tokens loaded and not recomputed.",
        fallback_line(results["systems"]),
    ]
    mismatched = {name: row["forced_claim_mismatches"] for name, row in results["systems"].items()
                  if row.get("forced_claim_mismatches")}
    if mismatched:
        lines.append("**the teacher-forced request was claimed differently from the greedy one** "
                     "on " + ", ".join(f"{n} pairs of {name}" for name, n in mismatched.items()))
    lines.append(f"reference (vanilla, one-step prefill) TTFT p50: "
                 f"{results['reference_ttft_median_s'] * 1000:.0f} ms")
    if results.get("sweep"):
        lines += ["",
                  "| kvshare rho | top-1 (forced) | KL (forced) | ROUGE-L | exact match "
                  "| first token | recomputed | TTFT p50 | fallbacks | = split "
                  "| ROUGE-L vs split |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in sorted(results["sweep"].values(), key=lambda r: r["rho"]):
            lines.append(
                f"| {row['rho']:g} | {format_or_dash(row.get('top1_agree'), '.1%')} | "
                f"{format_or_dash(row.get('kl_mean'), '.4f')} | {_bar(row['rouge_l'])} | "
                f"{row['exact_match']:.0%} | {row['first_token_agree']:.0%} | "
                f"{row['recompute_fraction']:.1%} | "
                f"{format_or_dash(row.get('ttft_median_s'), '.0f', ' ms', scale=1000)} | "
                f"{row['fallbacks']} | {format_or_dash(row.get('exact_match_vs_split'), '.0%')} "
                f"| {format_or_dash(row.get('rouge_l_vs_split'), '.3f')} |")
        lines.append("\n= split: share of pairs whose 64 tokens equal vanilla vLLM's under the "
                     "same prefill split (rho = 1 must be 100%)")
    return "\n".join(lines) + "\n"


def fallback_line(systems: dict[str, dict]) -> str:
    """The table's fallback line: which systems fell back to full recompute, how often."""
    counted = {name: row for name, row in systems.items()
               if row.get("available", True) and row.get("config") is not None}
    fell = {name: row for name, row in counted.items() if row["fallbacks"]}
    if not fell:
        return f"fallbacks: none ({', '.join(counted) or 'no connector system'})."
    return ("**fallbacks** (selective fill failed, claim recomputed in full): "
            + ", ".join(f"{name} {row['fallbacks']} of {row['requests']} requests"
                        for name, row in fell.items()) + ".")


def format_or_dash(value: float | None, spec: str, suffix: str = "", scale: float = 1.0
                   ) -> str:
    """A table cell: ``value * scale`` formatted with ``spec`` and ``suffix``, or "-"."""
    return "-" if value is None else format(value * scale, spec) + suffix


def _bar(value: float, width: int = 10) -> str:
    """``0.873 █████████░`` : the number with a bar, readable in a terminal and in markdown."""
    filled = round(max(0.0, min(1.0, value)) * width)
    return f"{value:.3f} {'█' * filled}{'░' * (width - filled)}"


def plot_sweep(results: dict, path: Path) -> None:
    """Teacher-forced top-1 agreement and ROUGE-L against median TTFT, over the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    sweep = sorted(results["sweep"].values(), key=lambda r: r["rho"])
    for ax, metric, label in ((axes[0], "top1_agree", "top-1 agreement, teacher-forced"),
                              (axes[1], "rouge_l", "mean ROUGE-L F1, greedy")):
        points = [(r["ttft_median_s"] * 1000, r[metric], r["rho"]) for r in sweep
                  if r.get(metric) is not None and r.get("ttft_median_s")]
        ax.plot([x for x, _, _ in points], [y for _, y, _ in points], "o-", label="kvshare (DHD)")
        for x, y, rho in points:
            ax.annotate(f"rho={rho:g}", (x, y), textcoords="offset points", xytext=(5, -10),
                        fontsize=8)
        for name, row in results["systems"].items():
            # the splits' TTFT includes their filler's prefill steps: not a time to plot.
            if (name != "kvshare" and name not in SPLIT_SYSTEMS and row.get("available", True)
                    and row.get("ttft_median_s") and row.get(metric) is not None):
                ax.plot(row["ttft_median_s"] * 1000, row[metric], "s", label=name)
        ax.axvline(results["reference_ttft_median_s"] * 1000, color="grey", linestyle="--",
                   label="vanilla TTFT (reference)")
        ax.set_xlabel("median TTFT of the later prompt (ms)")
        ax.set_ylabel(f"{label} vs full compute")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Quality vs TTFT, {results['pairs']} pairs, seed {results['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
