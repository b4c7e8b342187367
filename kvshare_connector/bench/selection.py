"""Which reused tokens to recompute: selection rules compared at equal recompute share.

DHD ranks the reused tokens by how far their fresh K/V at the check layer deviate from
the reused rows. Query-driven selection (ProphetKV) ranks them by the attention the
prompt's last tokens pay them instead; the engine also offers combinations
(:data:`kvshare.recompute.engine.SELECT_BY`). This study measures every rule at the same
``rho`` grid (``rho`` is a share of the reused tokens, so equal ``rho`` is equal recompute
share for every rule) with teacher-forced KL against full compute, on the same pairs as
``kvshare bench quality``, and says which rule reaches DHD's KL at DHD's default ``rho``
with the least recompute.

Two steps, because the pairs need the ShareGPT workload (CPU, this machine) and the sweep
wants a GPU (where the workload is not):

    python -m kvshare.bench.selection prepare --json pairs.json     # draws seeds 1, 2, 7
    python -m kvshare.bench.selection run pairs.json --model DIR --json out.json

Per pair (transformers, fp32, as ``kvshare bench decode-drift``): full compute prefills
the earlier and the later prompt and decodes up to 64 greedy tokens; the connector's fill
is emulated for each rule and ``rho`` (reuse plan, vLLM's block-aligned prefix hit, the
claim rule, re-rotated runs, the engine on the claim with the prompt's tail as probes,
``recompute_tail_by: vllm``); the model then prefills the tail over the filled K/V and is
teacher-forced through full compute's continuation. KL(full || fill) over the whole
vocabulary is taken at the prompt's last token and at every continuation position; the
mean over all positions of all pairs is the score (as ``bench quality``'s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from kvshare.bench.decode_drift import Model
    from kvshare.config import KVShareConfig
    from kvshare.recompute import PromptKV

TUNING_SEEDS = (1, 2)
HELD_OUT_SEED = 7
RHOS = (0.05, 0.1, 0.15, 0.2, 0.3)
"""The ``rho`` grid every rule is measured at (DHD's default, 0.15, in the middle)."""
DEFAULT_RHO = 0.15
RULES = {
    "deviation": ("deviation", 0.0),
    "attention": ("attention", 0.0),
    "both": ("both", 0.0),
    "per_head": ("per_head", 0.0),
    "rank@0.25": ("rank", 0.25),
    "rank@0.5": ("rank", 0.5),
    "rank@0.75": ("rank", 0.75),
}
"""Rule name -> (``select_by``, ``attention_weight``)."""
MAX_NEW_TOKENS = 64
TARGET_SHARE = 2 / 3
"""The issue's target: reach DHD's KL with at most this share of DHD's recompute."""


# ------------------------------------------------------------------------ prepare
def bench_config() -> KVShareConfig:
    """The defaults, claiming any reuse (as ``bench quality``: quality on every pair)."""
    from kvshare.config import KVShareConfig

    return KVShareConfig.from_dict({**KVShareConfig().to_dict(), "min_reuse_fraction": 0.0,
                                    "min_reuse_tokens": 1})


def prepare(args: argparse.Namespace) -> int:
    """Draw the tuning seeds' and the held-out seed's pairs (the held-out one without the
    tuning seeds' prompts) and write their chat-template token ids."""
    from kvshare.bench.quality import prepare_pairs

    config = bench_config()
    seeds: dict[str, dict] = {}
    for seed in (*TUNING_SEEDS, HELD_OUT_SEED):
        excluded = list(TUNING_SEEDS) if seed == HELD_OUT_SEED else []
        draw = argparse.Namespace(pairs=args.pairs, seed=seed, min_tokens=args.min_tokens,
                                  max_tokens=args.max_tokens)
        pairs = prepare_pairs(draw, config, excluded)
        seeds[str(seed)] = {"excluded_seeds": excluded, "pairs": [
            {**dataclasses.asdict(p), "claim": claim_of(config, p.earlier_ids, p.later_ids)}
            for p in pairs]}
        print(f"seed {seed}: {len(pairs)} pairs")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"pairs_per_seed": args.pairs, "seeds": seeds}))
    return 0


# ------------------------------------------------------------------------ one fill
def claim_of(config: KVShareConfig, earlier_ids: Sequence[int], later_ids: Sequence[int]
             ) -> dict | None:
    """What the connector claims of ``later_ids`` with ``earlier_ids`` stored (None:
    nothing): vLLM's block-aligned prefix hit ``start``, the claim's end ``end``, the
    claimed runs ``[dst_start, src_start, length]`` and the initial recompute positions
    (placeholders, boundaries). The rule and ``rho`` do not change it, so it is computed
    once, where the matching modules' dependencies are installed."""
    from kvshare.bench.decode_drift import vllm_prefix_hit
    from kvshare.matching.align import plan_reuse
    from kvshare.matching.claim import claimed_runs, decide_claim
    from kvshare.matching.plan import Candidate

    plan = plan_reuse(later_ids, [Candidate("earlier", np.asarray(earlier_ids))],
                      min_run_tokens=config.min_run_tokens)
    claim = decide_claim(plan, vllm_prefix_hit(earlier_ids, later_ids), config)
    if claim.num_claimed == 0:
        return None
    runs = [[r.dst_start, r.src_start, r.length] for r in claimed_runs(plan, claim)]
    covered = np.zeros(claim.end, dtype=bool)
    covered[:claim.start] = True
    for dst, _, length in runs:
        covered[dst:dst + length] = True
    return {"start": claim.start, "end": claim.end, "runs": runs,
            "initial": np.flatnonzero(~covered).tolist()}


@dataclass(frozen=True)
class Fill:
    head: PromptKV
    """Rows ``[0, end)`` as the connector leaves them (rows past ``end`` are probes)."""
    computed: int
    """Prompt tokens computed by the fill or after it (placeholders, boundaries, the
    rule's picks, the tail): ``T`` minus the reused tokens."""
    picked: int
    """Reused tokens the rule picked."""
    candidates: int
    """Reused tokens of the claim the rule chose among (``rho``'s base)."""


def connector_fill(model: Model, claim: dict, earlier_kv: PromptKV, later_ids: Sequence[int],
                   select_by: str, weight: float, rho: float, check_layers: Sequence[int]
                   ) -> Fill:
    """The connector's fill of ``claim`` (:func:`claim_of`): the claimed runs loaded from
    the earlier prompt's K/V with keys re-rotated, then the engine on the claim, the tail
    ``[end, T)`` as probes when the rule needs them (as the worker's fill)."""
    from kvshare.recompute import PromptKV, SelectiveRecomputeEngine, rerotate_keys

    adapter = model.adapter
    num_tokens, start, end = len(later_ids), claim["start"], claim["end"]
    probes = select_by != "deviation"
    rows = num_tokens if probes else end
    head = PromptKV.empty(adapter, rows)
    head.keys[:, :start] = earlier_kv.keys[:, :start]
    head.values[:, :start] = earlier_kv.values[:, :start]
    for dst, src, length in claim["runs"]:
        keys = earlier_kv.keys[:, src:src + length]
        delta = dst - src
        head.keys[:, dst:dst + length] = (rerotate_keys(keys, delta, adapter.rope_inv_freq)
                                          if delta else keys)
        head.values[:, dst:dst + length] = earlier_kv.values[:, src:src + length]
    engine = SelectiveRecomputeEngine(adapter, rho=rho, check_layers=check_layers,
                                      select_by=select_by, attention_weight=weight)
    initial = claim["initial"]
    result = engine.prefill(later_ids[:rows], head, initial, exact_prefix=start, logits=False,
                            probe_from=end if probes else None)
    picked = int(result.selected.numel())
    return Fill(head=head, computed=len(initial) + picked + num_tokens - end, picked=picked,
                candidates=end - start - len(initial))


# ------------------------------------------------------------------------ one pair
def measure_pair(model: Model, pair: dict, rules: dict, rhos: Sequence[float],
                 check_layers: Sequence[int]) -> dict | None:
    """KL per position (prompt's last token + continuation) for naive reuse and every
    rule at every ``rho``; None when nothing is claimed or full compute stops at once."""
    from kvshare.bench.decode_drift import full_prefill, greedy, step_kl, teacher_force

    earlier, later, claim = pair["earlier_ids"], pair["later_ids"], pair["claim"]
    if claim is None:
        return None
    earlier_kv, _ = full_prefill(model, earlier)
    full_kv, full_last = full_prefill(model, later)
    continuation = greedy(model, full_kv, full_last, MAX_NEW_TOKENS)
    if not continuation:
        return None
    steps = len(continuation)
    n = len(later)
    reference = teacher_force(model, full_kv, n - 1, [later[-1], *continuation],
                              attention=False).logits[-steps - 1:].cpu()
    runs: dict[str, dict] = {}
    end = claim["end"]
    points = [("naive", "deviation", 0.0, 0.0, ())] + [
        (f"{name}/{rho:g}", select_by, weight, rho, check_layers)
        for name, (select_by, weight) in rules.items() for rho in rhos]
    for key, select_by, weight, rho, layers in points:
        fill = connector_fill(model, claim, earlier_kv, later, select_by, weight, rho, layers)
        forced = teacher_force(model, fill.head, end, [*later[end:], *continuation],
                               attention=False).logits[-steps - 1:].cpu()
        runs[key] = {"kl": step_kl(reference, forced).tolist(),
                     "top1": (reference.argmax(-1) == forced.argmax(-1)).tolist(),
                     "computed": fill.computed, "picked": fill.picked,
                     "candidates": fill.candidates}
    return {"pair_id": pair["pair_id"], "kind": pair["kind"], "tokens": n, "steps": steps,
            "runs": runs}


# ------------------------------------------------------------------------ aggregate
def summarize(pairs: Sequence[dict]) -> dict[str, dict]:
    """Per run key: mean KL and top-1 over all positions, mean computed share of the
    prompt, mean share of the reused candidates picked."""
    keys = pairs[0]["runs"].keys()
    out = {}
    for key in keys:
        kls = [k for p in pairs for k in p["runs"][key]["kl"]]
        top1 = [t for p in pairs for t in p["runs"][key]["top1"]]
        out[key] = {
            "kl_mean": statistics.fmean(kls),
            "top1_agree": statistics.fmean(top1),
            "computed_share": statistics.fmean(p["runs"][key]["computed"] / p["tokens"]
                                               for p in pairs),
            "picked_share": statistics.fmean(p["runs"][key]["picked"]
                                             / max(1, p["runs"][key]["candidates"])
                                             for p in pairs),
            "pairs": len(pairs), "positions": len(kls)}
    return out


def share_to_reach(curve: Sequence[tuple[float, float]], target_kl: float) -> float | None:
    """The smallest x at which a curve of (x, KL) points, sorted by x, first reaches
    ``target_kl``: linear in x and log KL between the grid's points; None when no point
    reaches it; the first x when the first point already does (a bound, not a value)."""
    if curve[0][1] <= target_kl:
        return curve[0][0]
    for (x0, k0), (x1, k1) in zip(curve, curve[1:]):
        if k1 <= target_kl:
            t = (math.log(k0) - math.log(target_kl)) / (math.log(k0) - math.log(k1))
            return x0 + t * (x1 - x0)
    return None


def compare(summary: dict[str, dict], rules: Sequence[str], rhos: Sequence[float]) -> dict:
    """Per rule: its KL at each ``rho``, and where it reaches DHD's KL at ``DEFAULT_RHO``,
    in ``rho`` and in computed share of the prompt, relative to DHD's."""
    dhd = summary[f"deviation/{DEFAULT_RHO:g}"]
    out = {}
    for rule in rules:
        points = [summary[f"{rule}/{rho:g}"] for rho in rhos]
        kl_curve_rho = list(zip(rhos, (p["kl_mean"] for p in points)))
        kl_curve_share = [(p["computed_share"], p["kl_mean"]) for p in points]
        rho_needed = share_to_reach(kl_curve_rho, dhd["kl_mean"])
        share_needed = share_to_reach(kl_curve_share, dhd["kl_mean"])
        out[rule] = {
            "kl": {f"{rho:g}": p["kl_mean"] for rho, p in zip(rhos, points)},
            "computed_share": {f"{rho:g}": p["computed_share"] for rho, p in zip(rhos, points)},
            "kl_mean_over_grid": statistics.fmean(p["kl_mean"] for p in points),
            "rho_to_reach_dhd": rho_needed,
            "rho_ratio": None if rho_needed is None else rho_needed / DEFAULT_RHO,
            "share_to_reach_dhd": share_needed,
            "share_ratio": None if share_needed is None
            else share_needed / dhd["computed_share"],
            "bound": rho_needed == rhos[0]}
    return out


# ------------------------------------------------------------------------ run
def load_model(model_dir: str, device: str) -> Model:
    from transformers import AutoModelForCausalLM

    from kvshare.bench.decode_drift import Model
    from kvshare.recompute.hf_adapter import HFDecoderAdapter

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval().to(device)
    eos = model.generation_config.eos_token_id
    return Model(model, HFDecoderAdapter(model),
                 frozenset([eos] if isinstance(eos, int) else eos or ()))


def run(args: argparse.Namespace) -> int:
    data = json.loads(args.pairs_json.read_text())
    config = bench_config()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The decode-drift helpers build their input ids with torch.tensor(): on the model's
    # device only when it is the default one.
    torch.set_default_device(device)
    model = load_model(str(args.model), device)
    seeds = [s for s in args.seeds.split(",") if s]
    started = time.perf_counter()
    results: dict = {"device": device, "rhos": list(RHOS), "rules": {k: list(v) for k, v in
                                                                     RULES.items()},
                     "config": {k: getattr(config, k) for k in
                                ("check_layers", "recompute_tail_tokens", "recompute_tail_by",
                                 "min_run_tokens")},
                     "seeds": {}}
    for seed in seeds:
        pairs = data["seeds"][seed]["pairs"][:args.limit or None]
        measured, skipped = [], []
        for pair in pairs:
            if time.perf_counter() - started > args.deadline_s:
                break
            one = measure_pair(model, pair, RULES, RHOS, config.check_layers)
            (measured if one is not None else skipped).append(one or pair["pair_id"])
        summary = summarize(measured)
        results["seeds"][seed] = {
            "excluded_seeds": data["seeds"][seed]["excluded_seeds"], "pairs": len(measured),
            "skipped": skipped, "summary": summary,
            "compare": compare(summary, list(RULES), RHOS), "per_pair": measured}
        print(f"seed {seed}: {len(measured)} pairs, {time.perf_counter() - started:.0f} s",
              flush=True)
        args.json.write_text(json.dumps(results))
    tuning = [s for s in map(str, TUNING_SEEDS) if s in results["seeds"]]
    if tuning:
        pooled = summarize([p for s in tuning for p in results["seeds"][s]["per_pair"]])
        results["tuning"] = {"seeds": tuning, "summary": pooled,
                             "compare": compare(pooled, list(RULES), RHOS)}
    results["wall_s"] = time.perf_counter() - started
    args.json.write_text(json.dumps(results))
    args.json.with_suffix(".compact.json").write_text(json.dumps(compact(results), indent=1))
    print(report(results))
    return 0


# ------------------------------------------------------------------------ report
def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(compared: dict, summary: dict, title: str) -> str:
    """Markdown: KL per rule and rho, the computed share, where DHD's default is reached."""
    rhos = list(next(iter(compared.values()))["kl"])
    lines = [f"#### {title}\n",
             "| rule | " + " | ".join(f"KL @ rho {r}" for r in rhos)
             + " | mean | reaches DHD@0.15 at rho | share of DHD's |",
             "|---|" + "---:|" * (len(rhos) + 3)]
    for rule, row in compared.items():
        bound = "<= " if row["bound"] else ""
        lines.append(
            f"| {rule} | " + " | ".join(f"{row['kl'][r]:.5f}" for r in rhos)
            + f" | {row['kl_mean_over_grid']:.5f} | "
            + (f"{bound}{row['rho_to_reach_dhd']:.3f}" if row["rho_to_reach_dhd"] is not None
               else "not reached")
            + f" | {bound}{_cell(row['rho_ratio'], '.2f')} |")
    dhd = compared["deviation"]["computed_share"]
    lines.append("\nprompt tokens computed (1 - reused), DHD: "
                 + ", ".join(f"rho {r}: {dhd[r]:.1%}" for r in rhos)
                 + f"; naive reuse: KL {summary['naive']['kl_mean']:.5f} at "
                 f"{summary['naive']['computed_share']:.1%}")
    return "\n".join(lines)


def report(results: dict) -> str:
    parts = []
    if "tuning" in results:
        parts.append(table(results["tuning"]["compare"], results["tuning"]["summary"],
                           f"tuning seeds {', '.join(results['tuning']['seeds'])} pooled"))
    for seed, one in results["seeds"].items():
        parts.append(table(one["compare"], one["summary"],
                           f"seed {seed}, {one['pairs']} pairs"
                           + (f" (seeds {one['excluded_seeds']} left out)"
                              if one["excluded_seeds"] else "")))
    return "\n\n".join(parts)


def plot(summary: dict[str, dict], rules: Sequence[str], title: str, path: Path) -> None:
    """KL against the share of prompt tokens computed, one line per rule over the ``rho``
    grid, naive reuse as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule in rules:
        points = sorted((row["computed_share"], row["kl_mean"], key.split("/")[1])
                        for key, row in summary.items() if key.split("/")[0] == rule)
        ax.plot([100 * x for x, _, _ in points], [y for _, y, _ in points],
                "o-" if rule == "deviation" else ".--", label=rule)
        if rule == "deviation":
            for x, y, rho in points:
                ax.annotate(f"rho {rho}", (100 * x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
    naive = summary["naive"]
    ax.plot(100 * naive["computed_share"], naive["kl_mean"], "ks", label="naive reuse")
    ax.set_xlabel("prompt tokens computed (%)")
    ax.set_ylabel("KL(full || fill), nats, teacher-forced")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compact(results: dict) -> dict:
    """``results`` without the per-position lists: per pair, each run's mean KL and
    computed tokens (what docs/selection.md cites; the full file is regenerated by
    ``run``)."""
    out = {key: value for key, value in results.items() if key != "seeds"}
    out["seeds"] = {
        seed: {**{k: v for k, v in one.items() if k != "per_pair"}, "per_pair": [
            {**{k: v for k, v in pair.items() if k != "runs"},
             "runs": {key: {"kl_mean": statistics.fmean(run["kl"]),
                            "computed": run["computed"], "picked": run["picked"]}
                      for key, run in pair["runs"].items()}}
            for pair in one["per_pair"]]}
        for seed, one in results["seeds"].items()}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from kvshare.bench.workload import add_prompt_length_arguments

    parser = argparse.ArgumentParser(prog="python -m kvshare.bench.selection",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="draw the pairs (needs the ShareGPT workload)")
    prep.add_argument("--pairs", type=int, default=40)
    add_prompt_length_arguments(prep, 64, 768)
    prep.add_argument("--json", type=Path, required=True)
    sweep = sub.add_parser("run", help="measure every rule at every rho")
    sweep.add_argument("pairs_json", type=Path)
    sweep.add_argument("--model", type=Path, required=True, help="model directory")
    sweep.add_argument("--seeds", default=",".join(map(str, (*TUNING_SEEDS, HELD_OUT_SEED))))
    sweep.add_argument("--limit", type=int, default=0, help="pairs per seed (0: all)")
    sweep.add_argument("--device", default="")
    sweep.add_argument("--deadline-s", type=float, default=math.inf,
                       help="stop starting pairs after this many seconds")
    sweep.add_argument("--json", type=Path, required=True)
    draw = sub.add_parser("plot", help="plot a seed of a run's results")
    draw.add_argument("results_json", type=Path)
    draw.add_argument("--seed", default=str(HELD_OUT_SEED))
    draw.add_argument("--png", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.step == "plot":
        one = json.loads(args.results_json.read_text())["seeds"][args.seed]
        plot(one["summary"], list(one["compare"]),
             f"seed {args.seed}, {one['pairs']} pairs: selection rules at equal rho", args.png)
        return 0
    return prepare(args) if args.step == "prepare" else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
