"""``kvshare bench decode-drift``: does attention on reused tokens shift during decode?

DHD picks the reused tokens to recompute once, at prefill, by their K/V deviation at the
check layer. KVShare v2 reports that reused tokens which mattered little at prefill can
draw more attention while decoding, and recomputes a few of them during decode too. Before
building such a correction this benchmark measures, on the real model, whether that
happens here and what a decode-time score would find. Everything runs with transformers
on CPU (no vLLM), with the recompute engine exactly as the connector drives it.

Per held-out pair (:func:`kvshare.bench.quality.prepare_pairs`: the same pairs as
``kvshare bench quality`` for the same ``--pairs``/``--seed``/``--exclude-seeds``):

1. The earlier prompt is prefilled in full: its K/V stand for the stored chunks.
2. The later prompt's K/V two ways. *Full compute*: its own prefill. *kvshare*: the
   connector's fill emulated step by step: the reuse plan against the earlier prompt
   (:func:`kvshare.matching.align.plan_reuse`), vLLM's prefix-cache hit (the common
   prefix in whole ``VLLM_CPU_BLOCK_TOKENS`` blocks, exact), the claim rule
   (:func:`kvshare.matching.claim.decide_claim`), the claimed runs loaded with keys
   re-rotated, the engine's DHD prefill (the config's ``rho``, ``check_layers``,
   ``select_by``) on the claim, then the prompt's tail prefilled by the model over that
   K/V, as vLLM does after the fill.
3. Full compute decodes up to ``MAX_NEW_TOKENS`` greedy tokens (the reference
   continuation). Both K/V are then teacher-forced through it; per layer, decode step
   and prompt token we keep the attention mass (softmax over keys, mean over heads)
   and per step the next-token distribution. Decode step ``s`` is the forward pass that
   reads the ``s``-th generated token; step 0 is the prompt's last token.
4. Prefill mass: the attention the prompt's last ``PREFILL_QUERY_TOKENS`` tokens pay each
   prompt token under full compute, the "attention at prefill" of KVShare's argument.
5. Candidate decode-time corrections are simulated: after decode step 1, a share
   (``CORRECTION_BUDGETS``) of the reused tokens is recomputed (the engine, all layers,
   over the K/V as it stands), picked by one score each (:data:`POLICIES`), and the
   continuation is teacher-forced again; KL is compared over steps 2 on.

Each prompt position has one role (:data:`ROLES`): ``exact`` (vLLM's prefix hit or an
exact-prefix run: reused, and its K/V equal full compute's), ``computed`` (placeholders,
boundaries and the tail), ``dhd`` (reused, recomputed by DHD) or ``approx`` (reused: loaded
and not recomputed, with approximate K/V). Only ``approx`` tokens can drift, so only they
are candidates of a correction.

Units: attention masses are probabilities (a distribution over the prompt's tokens once
renormalised); K/V error is ``||K - K_full|| + ||V - V_full||`` (L2 over heads x head_dim,
as DHD scores deviation); KL is KL(full || kvshare) of next-token distributions over the
whole vocabulary, in nats.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvshare.bench.engine_config import add_config_arguments
from kvshare.bench.workload import add_prompt_length_arguments, check_prompt_lengths

if TYPE_CHECKING:
    from kvshare.bench.quality import PreparedPair
    from kvshare.config import KVShareConfig
    from kvshare.recompute import PromptKV
    from kvshare.recompute.hf_adapter import HFDecoderAdapter

MAX_NEW_TOKENS = 64
"""Decode steps measured per pair (fewer when full compute stops at end of sequence)."""
REPORTED_STEPS = (1, 8, 32, 64)
WINDOWS = ("1", "8", "32", "64", "all")
"""Decode-mass windows: one step's attention, or (``all``) the mean over every step."""
PREFILL_QUERY_TOKENS = 8
"""The prompt's last tokens whose attention is its "prefill mass": the end of the user
turn and the chat template's generation prompt, the queries closest to the first decode
step."""
RISEN_SHARE = 0.05
"""Share of the prompt's tokens, those whose mass rose most from prefill to decode."""
RECALL_SHARE = 0.05
"""recall@k: k is this share of the ``approx`` tokens (at least 1)."""
CORRECTION_BUDGETS = (0.05, 0.15)
"""Tokens a simulated correction recomputes, as shares of the reused tokens (the same base
as ``rho``): a third of DHD's default budget, and as much again."""
VLLM_CPU_BLOCK_TOKENS = 128
"""vLLM's CPU block size (its platform default): its prefix cache hits whole blocks."""
ROLES = ("exact", "computed", "dhd", "approx")
EXACT, COMPUTED, DHD, APPROX = range(len(ROLES))
POLICIES = ("none", "deviation", "probe_attention", "decode_attention",
            "attention_x_deviation", "oracle_error")
"""How a correction picks ``approx`` tokens: ``deviation``: DHD's own prefill score (what a
larger rho would add); ``probe_attention``: the prefill mass at the score layer (the
attention of the prompt's end, available at prefill); ``decode_attention``: the first
decode step's attention at the score layer (``@mean``: mean over all layers);
``attention_x_deviation``: decode attention times deviation; ``oracle_error``: the true
K/V error summed over layers (unknowable, an upper reference)."""


EPILOG = """\
Runs SmolLM2 with transformers on CPU (fp32), no vLLM. Per pair: the later prompt's K/V by
full compute and by kvshare's fill (plan, claim, DHD, tail), 64 greedy tokens of full
compute teacher-forced over both, attention per layer and step, KL per step, and
simulated decode-time corrections.

example (the report's figures):
  kvshare bench decode-drift --pairs 40 --seed 7 --exclude-seeds 1,2 \\
      --json results/decode_drift.json --plot docs/img/decode_drift.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--pairs", type=int, default=16, metavar="N",
                        help="prompt pairs, half similar-stream, half edits, as in "
                             "`kvshare bench quality` (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed that draws the pairs "
                        "(default: 0)")
    parser.add_argument("--exclude-seeds", default="", metavar="S,S",
                        help="leave out the prompts of the pairs these seeds draw")
    parser.add_argument("--steps", type=int, default=MAX_NEW_TOKENS, metavar="N",
                        help=f"greedy tokens decoded and measured (default: {MAX_NEW_TOKENS})")
    parser.add_argument("--score-layers", default="", metavar="L,L",
                        help="layers whose attention the simulated corrections score at "
                             "(default: the config's check_layers)")
    add_prompt_length_arguments(parser, 64, 768)
    add_config_arguments(parser)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write the figure here")


# ------------------------------------------------------------------------ model
@dataclass
class Model:
    """SmolLM2 in fp32 with eager attention (the only one that returns probabilities)."""

    model: torch.nn.Module
    adapter: HFDecoderAdapter
    eos_ids: frozenset[int]


def load_model(config: KVShareConfig) -> Model:
    from transformers import AutoModelForCausalLM

    from kvshare.model_assets import resolve_model_dir
    from kvshare.recompute.hf_adapter import HFDecoderAdapter

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(config.model, config.home_dir), dtype=torch.float32,
        attn_implementation="eager").eval()
    eos = model.generation_config.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else eos or ())
    return Model(model, HFDecoderAdapter(model), eos_ids)


def _cache(kv: PromptKV, rows: int):
    """A transformers cache holding rows ``[0, rows)`` of ``kv``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(kv.keys.shape[0]):
        cache.update(kv.keys[layer, :rows].transpose(0, 1)[None],
                     kv.values[layer, :rows].transpose(0, 1)[None], layer)
    return cache


def _cache_kv(cache) -> PromptKV:
    from kvshare.recompute import PromptKV

    return PromptKV(keys=torch.stack([c.keys[0].transpose(0, 1) for c in cache.layers]),
                    values=torch.stack([c.values[0].transpose(0, 1) for c in cache.layers]))


@dataclass
class Forced:
    """One teacher-forced pass: tokens appended to a cached prefix."""

    logits: torch.Tensor
    """float32 ``[n, vocab]``: next-token logits after each appended token."""
    attention: torch.Tensor | None
    """float32 ``[layers, n, N]``: each appended token's attention over all ``N`` rows
    (prefix + appended), mean over heads; None when not asked for."""
    kv: PromptKV
    """K/V of all ``N`` rows after the pass."""


@torch.no_grad()
def teacher_force(model: Model, prefix: PromptKV, prefix_rows: int, tokens: Sequence[int],
                  attention: bool = True) -> Forced:
    """Run ``tokens`` after rows ``[0, prefix_rows)`` of ``prefix``, as a decoder would."""
    cache = _cache(prefix, prefix_rows)
    out = model.model(torch.tensor([list(tokens)]), past_key_values=cache, use_cache=True,
                      output_attentions=attention)
    probs = (torch.stack([a[0].float().mean(0) for a in out.attentions])
             if attention else None)
    return Forced(out.logits[0].float(), probs, _cache_kv(out.past_key_values))


@torch.no_grad()
def full_prefill(model: Model, token_ids: Sequence[int]) -> tuple[PromptKV, torch.Tensor]:
    """The prompt's own K/V and its last token's logits."""
    out = model.model(torch.tensor([list(token_ids)]), use_cache=True, logits_to_keep=1)
    return _cache_kv(out.past_key_values), out.logits[0, -1].float()


@torch.no_grad()
def greedy(model: Model, kv: PromptKV, last_logits: torch.Tensor, max_tokens: int
           ) -> list[int]:
    """Full compute's greedy continuation: up to ``max_tokens`` tokens, ending before an
    end-of-sequence token (which no decode step reads)."""
    cache = _cache(kv, kv.num_tokens)
    tokens: list[int] = []
    logits = last_logits
    while len(tokens) < max_tokens:
        token = int(logits.argmax())
        if token in model.eos_ids:
            break
        tokens.append(token)
        if len(tokens) < max_tokens:
            logits = model.model(torch.tensor([[token]]), past_key_values=cache,
                                 use_cache=True).logits[0, -1].float()
    return tokens


# ------------------------------------------------------------------------ kvshare's fill
@dataclass
class Fill:
    """The later prompt's K/V as the connector leaves it, and how each row got there."""

    head: PromptKV
    """Rows ``[0, end)``: vLLM's prefix hit, then the claim after the engine's prefill."""
    start: int
    """vLLM's prefix hit (exact rows, never written by kvshare)."""
    end: int
    """One past the claim; vLLM prefills ``[end, T)`` over ``head``."""
    roles: np.ndarray
    """int8 ``[T]``: one of :data:`ROLES` per position."""
    deviation: np.ndarray
    """float32 ``[T]``: DHD's score at the first check layer (reused positions; 0 else)."""
    num_reused: int
    """Reused positions of the claim (DHD's base for ``rho``)."""


def vllm_prefix_hit(earlier: Sequence[int], later: Sequence[int]) -> int:
    """Tokens vLLM's prefix cache serves: the common prefix in whole blocks, below the
    last prompt token (which vLLM always computes)."""
    common = 0
    for a, b in zip(earlier, later):
        if a != b:
            break
        common += 1
    blocks = min(common, len(later) - 1) // VLLM_CPU_BLOCK_TOKENS
    return blocks * VLLM_CPU_BLOCK_TOKENS


def kvshare_fill(model: Model, config: KVShareConfig, earlier_ids: Sequence[int],
                 earlier_kv: PromptKV, later_ids: Sequence[int], full_kv: PromptKV
                 ) -> Fill | None:
    """The connector's fill of ``later_ids`` from ``earlier_ids``' stored K/V (None: the
    connector would claim nothing). Mirrors the worker's ``_fill``: same plan, claim,
    re-rotation and engine call. ``full_kv`` only scores DHD's deviation for the report
    (below the check layer every claimed row is fresh, so fresh rows at the check layer
    are full compute's)."""
    from kvshare.matching.align import plan_reuse
    from kvshare.matching.claim import claimed_runs, decide_claim, tail_start
    from kvshare.matching.plan import Candidate
    from kvshare.recompute import PromptKV, SelectiveRecomputeEngine, rerotate_keys
    from kvshare.recompute.engine import MassBudget

    adapter = model.adapter
    num_tokens = len(later_ids)
    plan = plan_reuse(later_ids, [Candidate("earlier", np.asarray(earlier_ids))],
                      min_run_tokens=config.min_run_tokens)
    start = vllm_prefix_hit(earlier_ids, later_ids)
    claim = decide_claim(plan, start, config)
    if claim.num_claimed == 0:
        return None
    start, end = claim.start, claim.end
    probes = config.select_by != "deviation"
    rows = num_tokens if probes else end
    head = PromptKV.empty(adapter, rows)
    head.keys[:, :start] = earlier_kv.keys[:, :start]
    head.values[:, :start] = earlier_kv.values[:, :start]
    pending = torch.ones(end, dtype=torch.bool)
    pending[:start] = False
    roles = np.full(num_tokens, COMPUTED, dtype=np.int8)
    roles[:start] = EXACT
    for run in claimed_runs(plan, claim):
        src = slice(run.src_start, run.src_start + run.length)
        dst = slice(run.dst_start, run.dst_end)
        delta = run.dst_start - run.src_start
        keys = earlier_kv.keys[:, src]
        head.keys[:, dst] = rerotate_keys(keys, delta, adapter.rope_inv_freq) if delta else keys
        head.values[:, dst] = earlier_kv.values[:, src]
        pending[dst] = False
        roles[dst] = APPROX
    # The plan's exact-prefix run reads rows computed after the very same tokens: exact.
    exact_end = plan.runs[0].dst_end if plan.runs and plan.runs[0].is_exact_prefix else 0
    roles[start:min(exact_end, end)] = EXACT
    check = config.check_layers[0] if config.check_layers else None
    deviation = np.zeros(num_tokens, dtype=np.float32)
    if check is not None:
        deviation[:end] = (_row_error(head, full_kv, check, end)).numpy()
    pending[max(start, tail_start(num_tokens, config)):] = True
    roles[np.flatnonzero(pending.numpy())] = COMPUTED
    budget = (MassBudget(config.rho_mass, config.rho_min, config.rho_max)
              if config.rho_mass > 0 else None)
    engine = SelectiveRecomputeEngine(adapter, rho=config.rho, check_layers=config.check_layers,
                                      select_by=config.select_by, budget=budget)
    result = engine.prefill(later_ids[:rows], head, pending.nonzero().flatten(),
                            exact_prefix=start, logits=False,
                            probe_from=end if probes else None)
    roles[result.selected.numpy()] = DHD
    deviation[roles == COMPUTED] = 0.0
    return Fill(head=head, start=start, end=end, roles=roles, deviation=deviation,
                num_reused=int(np.isin(roles[start:end], (EXACT, DHD, APPROX)).sum()))


def _row_error(kv: PromptKV, reference: PromptKV, layer: int | slice, rows: int) -> torch.Tensor:
    """``||K - K_ref|| + ||V - V_ref||`` per row of ``[0, rows)`` (L2 over heads x dim),
    ``[rows]`` for one layer or ``[layers, rows]`` for a slice."""
    dk = (kv.keys[layer, :rows] - reference.keys[layer, :rows]).float()
    dv = (kv.values[layer, :rows] - reference.values[layer, :rows]).float()
    return dk.flatten(-2).norm(dim=-1) + dv.flatten(-2).norm(dim=-1)


# ------------------------------------------------------------------------ metrics
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by order); NaN below 3 values or when one
    side is constant."""
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)
              for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def top(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest ``scores`` (stable order among ties)."""
    return np.argsort(-scores, kind="stable")[:count]


def recall_at_k(score: np.ndarray, target: np.ndarray, k: int) -> float:
    """Share of the ``k`` largest ``target`` items among the ``k`` largest ``score`` items."""
    if k <= 0 or target.size == 0:
        return math.nan
    return len(set(top(score, k).tolist()) & set(top(target, k).tolist())) / k


def prompt_masses(attention: torch.Tensor, prompt_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Split each query's attention ``[layers, n, N]`` into its distribution over the prompt
    (renormalised, ``[layers, n, prompt_tokens]``, rows sum to 1) and the share of its
    attention that lands on the prompt at all (``[layers, n]``)."""
    on_prompt = attention[..., :prompt_tokens].double()
    share = on_prompt.sum(-1)
    return (on_prompt / share[..., None]).numpy(), share.numpy()


def step_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """KL(reference || system) per row, nats, over the whole vocabulary."""
    p = torch.log_softmax(reference_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0).numpy()


@dataclass
class LayerMetrics:
    """One decode window's measurements, each a list over layers (NaN: undefined for this
    pair, e.g. no ``approx`` token among the risen ones)."""

    prefill_decode_spearman: list[float]
    """Rank correlation, over prompt tokens, of prefill mass and full compute's decode mass."""
    approx_share_prefill: list[float]
    """Share of the prefill mass on ``approx`` tokens."""
    approx_share_decode: list[float]
    """Share of full compute's decode mass (over the prompt) on ``approx`` tokens."""
    approx_share_decode_kvshare: list[float]
    """The same with kvshare's K/V."""
    prompt_share_decode: list[float]
    """Share of full compute's decode attention on the prompt (the rest: generated tokens)."""
    risen_roles: dict[str, list[float]]
    """Role shares of the ``RISEN_SHARE`` prompt tokens whose mass rose most (decode minus
    prefill, full compute)."""
    risen_dhd_of_reused: list[float]
    """Of the risen tokens DHD could pick (``dhd`` or ``approx``), the share it picked."""
    risen_relative_deviation: list[float]
    """On risen ``approx`` tokens: sum |kvshare - full| decode mass / sum full decode mass."""
    decode_tv: list[float]
    """Total variation distance of kvshare's and full compute's decode mass over the prompt."""
    error_spearman: list[float]
    """Over ``approx`` tokens: rank correlation of kvshare's decode attention at this layer
    with the token's K/V error summed over layers."""
    error_recall: list[float]
    """recall@k of that attention for the tokens of largest K/V error."""
    weighted_error_recall: list[float]
    """recall@k of that attention for the tokens of largest decode-weighted error
    (sum over layers of full decode mass x K/V error: error where decode looks)."""


@dataclass
class PairDrift:
    """Everything measured on one pair."""

    pair_id: str
    kind: str
    prompt_tokens: int
    steps: int
    roles: dict[str, int]
    num_reused: int
    windows: dict[str, LayerMetrics]
    baselines: dict[str, float]
    """recall@k of layer-independent scores of ``approx`` tokens (window ``all``): DHD's
    prefill ``deviation`` and ``random`` (k / n), for the total and the weighted error."""
    kl: list[float]
    """KL(full || kvshare) per step, step 0 (the prompt's last token) to ``steps``."""
    top1: list[bool]
    """kvshare's argmax equals full compute's, per step."""
    corrections: list[Correction] = field(default_factory=list)
    """One per budget of ``CORRECTION_BUDGETS``."""


@dataclass
class Correction:
    """Simulated corrections of one pair at one budget."""

    budget: float
    """Share of the reused tokens recomputed."""
    tokens: int
    """Tokens recomputed (0: the pair has too few ``approx`` tokens; nothing simulated)."""
    kl: dict[str, list[float]]
    """Per policy: KL(full || corrected) per decode step 2.. (``none``: uncorrected)."""


def layer_metrics(prefill: np.ndarray, decode_full: np.ndarray, decode_kvshare: np.ndarray,
                  prompt_share: np.ndarray, roles: np.ndarray, error: np.ndarray,
                  weighted_error: np.ndarray) -> LayerMetrics:
    """Compare masses ``[layers, T]`` (distributions over the prompt) of one window.

    ``error`` and ``weighted_error`` are per-token targets ``[T]``; ``prompt_share`` is
    ``[layers]``."""
    approx = roles == APPROX
    candidates = np.isin(roles, (DHD, APPROX))
    num_risen = max(1, round(RISEN_SHARE * roles.size))
    k = max(1, round(RECALL_SHARE * int(approx.sum())))
    m = LayerMetrics([], [], [], [], [], {r: [] for r in ROLES}, [], [], [], [], [], [])
    for layer in range(prefill.shape[0]):
        p, d, s = prefill[layer], decode_full[layer], decode_kvshare[layer]
        risen = top(d - p, num_risen)
        risen_approx = risen[approx[risen]]
        risen_candidates = risen[candidates[risen]]
        m.prefill_decode_spearman.append(spearman(p, d))
        m.approx_share_prefill.append(float(p[approx].sum()))
        m.approx_share_decode.append(float(d[approx].sum()))
        m.approx_share_decode_kvshare.append(float(s[approx].sum()))
        m.prompt_share_decode.append(float(prompt_share[layer]))
        for code, role in enumerate(ROLES):
            m.risen_roles[role].append(float((roles[risen] == code).mean()))
        m.risen_dhd_of_reused.append(float((roles[risen_candidates] == DHD).mean())
                                     if risen_candidates.size else math.nan)
        full_on = d[risen_approx].sum()
        m.risen_relative_deviation.append(
            float(np.abs(s[risen_approx] - d[risen_approx]).sum() / full_on)
            if risen_approx.size and full_on > 0 else math.nan)
        m.decode_tv.append(float(0.5 * np.abs(s - d).sum()))
        m.error_spearman.append(spearman(s[approx], error[approx]) if approx.any() else math.nan)
        m.error_recall.append(recall_at_k(s[approx], error[approx], k) if approx.any()
                              else math.nan)
        m.weighted_error_recall.append(
            recall_at_k(s[approx], weighted_error[approx], k) if approx.any() else math.nan)
    return m


def window_mass(masses: np.ndarray, window: str) -> np.ndarray | None:
    """``[layers, steps, T]`` -> ``[layers, T]``: one step's mass (``"8"``: step 8) or the
    mean over all steps (``"all"``); None when the pair decoded fewer steps."""
    if window == "all":
        return masses.mean(1)
    step = int(window)
    return masses[:, step - 1] if step <= masses.shape[1] else None


# ------------------------------------------------------------------------ one pair
def measure_pair(model: Model, config: KVShareConfig, pair: PreparedPair, steps: int,
                 score_layers: Sequence[int]) -> PairDrift | None:
    """All measurements of one pair (None: kvshare would claim nothing, or full compute
    ends its answer at once)."""
    earlier_kv, _ = full_prefill(model, pair.earlier_ids)
    full_kv, full_last = full_prefill(model, pair.later_ids)
    fill = kvshare_fill(model, config, pair.earlier_ids, earlier_kv, pair.later_ids, full_kv)
    continuation = greedy(model, full_kv, full_last, steps)
    if fill is None or not continuation:
        return None
    num_tokens, end, steps = len(pair.later_ids), fill.end, len(continuation)
    # Full compute's pass starts early enough to hold the prefill queries; kvshare's at
    # the end of the claim, where vLLM takes over. Both end with the decode steps.
    full_from = min(end, num_tokens - PREFILL_QUERY_TOKENS)
    full = teacher_force(model, full_kv, full_from, [*pair.later_ids[full_from:], *continuation])
    kvshare = teacher_force(model, fill.head, end, [*pair.later_ids[end:], *continuation])

    masses_full, share_full = prompt_masses(full.attention[:, -steps:], num_tokens)
    masses_kvshare, _ = prompt_masses(kvshare.attention[:, -steps:], num_tokens)
    prefill_queries = full.attention[:, -steps - PREFILL_QUERY_TOKENS:-steps]
    prefill = prompt_masses(prefill_queries.mean(1, keepdim=True), num_tokens)[0][:, 0]
    layer_error = _row_error(kvshare.kv, full.kv, slice(None), num_tokens).numpy()
    error = layer_error.sum(0)
    weighted = (masses_full.mean(1) * layer_error).sum(0)

    windows = {}
    for window in WINDOWS:
        d_full, d_kvshare = window_mass(masses_full, window), window_mass(masses_kvshare, window)
        if d_full is None:
            continue
        share = share_full.mean(1) if window == "all" else share_full[:, int(window) - 1]
        windows[window] = layer_metrics(prefill, d_full, d_kvshare, share, fill.roles, error,
                                        weighted)
    approx = np.flatnonzero(fill.roles == APPROX)
    k = max(1, round(RECALL_SHARE * approx.size))
    baselines = {
        "deviation_error_recall": recall_at_k(fill.deviation[approx], error[approx], k),
        "deviation_weighted_error_recall": recall_at_k(fill.deviation[approx],
                                                       weighted[approx], k),
        "deviation_error_spearman": spearman(fill.deviation[approx], error[approx]),
        "random_recall": k / approx.size if approx.size else math.nan,
    }
    # Rows of step 0 (the prompt's last token) to step ``steps``.
    full_logits, kvshare_logits = full.logits[-steps - 1:], kvshare.logits[-steps - 1:]
    kl = step_kl(full_logits, kvshare_logits)
    top1 = full_logits.argmax(-1) == kvshare_logits.argmax(-1)
    drift = PairDrift(
        pair_id=pair.pair_id, kind=pair.kind, prompt_tokens=num_tokens, steps=steps,
        roles={role: int((fill.roles == code).sum()) for code, role in enumerate(ROLES)},
        num_reused=fill.num_reused, windows=windows, baselines=baselines,
        kl=kl.tolist(), top1=top1.tolist())
    if steps >= 2:
        drift.corrections = [
            simulate_correction(model, pair, fill, kvshare, full, continuation, budget,
                                correction_scores(fill, prefill, masses_kvshare[:, 0], error,
                                                  score_layers))
            for budget in CORRECTION_BUDGETS]
    return drift


def correction_scores(fill: Fill, prefill: np.ndarray, decode_kvshare: np.ndarray,
                      error: np.ndarray, score_layers: Sequence[int]) -> dict[str, np.ndarray]:
    """Each policy's score of every prompt token (only ``approx`` tokens are ever picked).

    ``decode_kvshare`` is kvshare's mass at decode step 1 ``[layers, T]``: what the
    correction would see; ``prefill`` is full compute's prefill mass, equal to kvshare's at
    and below the check layer (those rows are all fresh)."""
    scores = {"deviation": fill.deviation}
    layers: list[tuple[str, np.ndarray, np.ndarray]] = [
        (str(layer), prefill[layer], decode_kvshare[layer]) for layer in score_layers]
    layers.append(("mean", prefill.mean(0), decode_kvshare.mean(0)))
    for name, probe, decode in layers:
        scores[f"probe_attention@{name}"] = probe
        scores[f"decode_attention@{name}"] = decode
        scores[f"attention_x_deviation@{name}"] = decode * fill.deviation
    scores["oracle_error"] = error
    return scores


def simulate_correction(model: Model, pair: PreparedPair, fill: Fill, kvshare: Forced,
                        full: Forced, continuation: Sequence[int], budget: float,
                        scores: dict[str, np.ndarray]) -> Correction:
    """KL per decode step 2.. after recomputing ``budget`` of the reused tokens once step 1
    has run, per policy of ``scores`` (plus ``none``, the uncorrected K/V).

    The picked tokens are recomputed by the engine through every layer over the K/V as it
    stands (their hidden states are not kept), as a decode-time correction would; the
    tail and step 1's row keep what vLLM computed before the correction."""
    from kvshare.recompute import PromptKV, SelectiveRecomputeEngine

    num_tokens, end, steps = len(pair.later_ids), fill.end, len(continuation)
    approx = np.flatnonzero(fill.roles == APPROX)
    tokens = min(approx.size, round(budget * fill.num_reused))
    reference = full.logits[-steps + 1:]
    kl = {"none": step_kl(reference, kvshare.logits[-steps + 1:]).tolist()}
    if tokens == 0:
        return Correction(budget, 0, {})
    engine = SelectiveRecomputeEngine(model.adapter, rho=0.0, check_layers=())
    rows = num_tokens + 1  # the prompt and step 1's token
    for name, score in scores.items():
        picks = approx[top(score[approx], tokens)]
        corrected = PromptKV(kvshare.kv.keys[:, :rows].clone(),
                             kvshare.kv.values[:, :rows].clone())
        head = PromptKV(corrected.keys[:, :end], corrected.values[:, :end])
        engine.prefill(pair.later_ids[:end], head, torch.from_numpy(picks),
                       exact_prefix=fill.start, logits=False)
        forced = teacher_force(model, corrected, rows, continuation[1:], attention=False)
        kl[name] = step_kl(reference, forced.logits).tolist()
    return Correction(budget, tokens, kl)


# ------------------------------------------------------------------------ aggregate
def _nanmean(values: Sequence[float]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(kept) if kept else None


def aggregate(drifts: Sequence[PairDrift]) -> dict:
    """Means over pairs (each pair weighs equally) of every per-layer metric, per window;
    KL and top-1 per step; correction KL per policy."""
    layers_of = {}
    for window in WINDOWS:
        present = [d.windows[window] for d in drifts if window in d.windows]
        if not present:
            continue
        summary: dict = {"pairs": len(present)}
        for name in (f.name for f in fields(LayerMetrics)):
            if name == "risen_roles":
                summary[name] = {role: [_nanmean(col) for col in zip(*(getattr(m, name)[role]
                                                                       for m in present))]
                                 for role in ROLES}
            else:
                summary[name] = [_nanmean(col) for col in zip(*(getattr(m, name)
                                                                for m in present))]
        layers_of[window] = summary
    max_steps = max(d.steps for d in drifts)
    per_step = {
        "kl_mean": [_nanmean([d.kl[s] for d in drifts if s < len(d.kl)])
                    for s in range(max_steps + 1)],
        "kl_median": [statistics.median([d.kl[s] for d in drifts if s < len(d.kl)])
                      for s in range(max_steps + 1)],
        "top1": [_nanmean([float(d.top1[s]) for d in drifts if s < len(d.top1)])
                 for s in range(max_steps + 1)],
        "pairs": [sum(s < len(d.kl) for d in drifts) for s in range(max_steps + 1)],
    }
    corrections = {}
    for index, budget in enumerate(CORRECTION_BUDGETS):
        done = [d.corrections[index] for d in drifts
                if len(d.corrections) > index and d.corrections[index].tokens]
        if not done:
            continue
        corrections[f"{budget:g}"] = {
            "budget_share_of_reused": budget, "pairs": len(done),
            "tokens_mean": statistics.fmean(c.tokens for c in done),
            "policies": {
                name: {"kl_mean": statistics.fmean(statistics.fmean(c.kl[name]) for c in done),
                       "kl_per_step": [_nanmean([c.kl[name][s] for c in done
                                                 if s < len(c.kl[name])])
                                       for s in range(max_steps - 1)]}
                for name in done[0].kl}}
    baselines = {key: _nanmean([d.baselines[key] for d in drifts])
                 for key in drifts[0].baselines}
    return {
        "pairs": len(drifts),
        "pair_kinds": {k: sum(d.kind.startswith(k) for d in drifts) for k in ("similar", "edit")},
        "roles_mean": {role: statistics.fmean(d.roles[role] / d.prompt_tokens for d in drifts)
                       for role in ROLES},
        "prompt_tokens_mean": statistics.fmean(d.prompt_tokens for d in drifts),
        "steps_mean": statistics.fmean(d.steps for d in drifts),
        "layers": layers_of,
        "baselines": baselines,
        "per_step": per_step,
        "corrections": corrections,
    }


# ------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvshare.bench.engine_config import base_config
    from kvshare.bench.quality import excluded_seeds, prepare_pairs

    if args.pairs < 2:
        raise SystemExit(f"--pairs must be >= 2 (half similar, half edits), got {args.pairs}")
    if not 1 <= args.steps <= MAX_NEW_TOKENS:
        raise SystemExit(f"--steps must be in [1, {MAX_NEW_TOKENS}], got {args.steps}")
    check_prompt_lengths(args)
    excluded = excluded_seeds(args)
    config = base_config(args.config, args.sets)
    config = type(config).from_dict({**config.to_dict(), "min_reuse_fraction": 0.0,
                                     "min_reuse_tokens": 1})  # as bench quality: claim any reuse
    score_layers = _parse_layers(args.score_layers, config)
    started = time.perf_counter()
    pairs = prepare_pairs(args, config, excluded)
    model = load_model(config)
    if not all(0 <= layer < model.adapter.num_layers for layer in score_layers):
        raise SystemExit(f"--score-layers {list(score_layers)} out of range for a model with "
                         f"{model.adapter.num_layers} layers")
    drifts: list[PairDrift] = []
    skipped: list[str] = []
    for pair in tqdm(pairs, desc="decode drift", unit="pair"):
        drift = measure_pair(model, config, pair, args.steps, score_layers)
        if drift is None:
            skipped.append(pair.pair_id)
        else:
            drifts.append(drift)
    if not drifts:
        raise SystemExit("no pair was claimed by kvshare; nothing to measure")
    results = {"seed": args.seed, "excluded_seeds": excluded, "steps": args.steps,
               "config": {key: getattr(config, key) for key in
                          ("rho", "check_layers", "select_by", "rho_mass",
                           "recompute_tail_tokens", "recompute_tail_by")},
               "score_layers": list(score_layers), "skipped": skipped,
               **aggregate(drifts),
               "per_pair": [{**asdict(d), "windows": None} for d in drifts],
               "wall_s": time.perf_counter() - started}
    print(markdown_report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"JSON written to {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"figure written to {args.plot}")
    return 0


def _parse_layers(value: str, config: KVShareConfig) -> tuple[int, ...]:
    if not value.strip():
        return tuple(config.check_layers) or (1,)
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise SystemExit(f"--score-layers expects layer numbers separated by commas, got "
                         f"{value!r}") from None


# ------------------------------------------------------------------------ report
def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _best(values: Sequence[float | None]) -> str:
    """``0.62 (L8)``: the largest value and its layer."""
    layer = max((i for i, v in enumerate(values) if v is not None), key=lambda i: values[i],
                default=None)
    return "-" if layer is None else f"{values[layer]:.2f} (L{layer})"


def markdown_report(results: dict) -> str:
    """The per-layer table (all steps), the per-step summary and the corrections."""
    layers = results["layers"]
    everything = layers["all"]
    lines = [
        f"### Decode drift: {results['pairs']} pairs (seed {results['seed']}), "
        f"{results['steps_mean']:.1f} decode steps on average\n",
        "| layer | rank corr. prefill vs decode | approx share prefill | approx share decode "
        "(full / kvshare) | risen: approx / dhd / computed / exact | DHD picked of risen reused "
        "| deviation on risen approx | TV decode | attn vs error rank corr. | recall@5% error "
        "| recall@5% weighted error |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in range(len(everything["decode_tv"])):
        roles = everything["risen_roles"]
        lines.append(
            f"| {layer} | {_cell(everything['prefill_decode_spearman'][layer], '.2f')} | "
            f"{_cell(everything['approx_share_prefill'][layer], '.1%')} | "
            f"{_cell(everything['approx_share_decode'][layer], '.1%')} / "
            f"{_cell(everything['approx_share_decode_kvshare'][layer], '.1%')} | "
            + " / ".join(_cell(roles[r][layer], ".0%") for r in ("approx", "dhd", "computed",
                                                                 "exact"))
            + f" | {_cell(everything['risen_dhd_of_reused'][layer], '.0%')} | "
            f"{_cell(everything['risen_relative_deviation'][layer], '.1%')} | "
            f"{_cell(everything['decode_tv'][layer], '.3f')} | "
            f"{_cell(everything['error_spearman'][layer], '.2f')} | "
            f"{_cell(everything['error_recall'][layer], '.2f')} | "
            f"{_cell(everything['weighted_error_recall'][layer], '.2f')} |")
    base = results["baselines"]
    lines += [
        "",
        f"baselines (approx tokens): DHD's prefill deviation recall@5% error "
        f"{_cell(base['deviation_error_recall'], '.2f')}, weighted error "
        f"{_cell(base['deviation_weighted_error_recall'], '.2f')}, rank corr. with error "
        f"{_cell(base['deviation_error_spearman'], '.2f')}; random recall "
        f"{_cell(base['random_recall'], '.2f')}.",
        "",
        "| step | pairs | KL mean | KL median | top-1 | approx share decode (mean over layers) "
        "| TV decode (mean over layers) | rank corr. prefill vs decode (mean over layers) "
        "| recall@5% weighted error (layer 1 / best layer) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    per_step = results["per_step"]
    lines.append(f"| 0 (prefill) | {per_step['pairs'][0]} | {per_step['kl_mean'][0]:.4f} | "
                 f"{per_step['kl_median'][0]:.4f} | {per_step['top1'][0]:.0%} | - | - | - | - |")
    for window in WINDOWS:
        if window not in layers or window == "all":
            continue
        step = int(window)
        m = layers[window]
        lines.append(
            f"| {step} | {per_step['pairs'][step]} | {per_step['kl_mean'][step]:.4f} | "
            f"{per_step['kl_median'][step]:.4f} | {per_step['top1'][step]:.0%} | "
            f"{_cell(_nanmean(m['approx_share_decode']), '.1%')} | "
            f"{_cell(_nanmean(m['decode_tv']), '.3f')} | "
            f"{_cell(_nanmean(m['prefill_decode_spearman']), '.2f')} | "
            f"{_cell(m['weighted_error_recall'][1], '.2f')} / "
            f"{_best(m['weighted_error_recall'])} |")
    for budget in results["corrections"].values():
        none = budget["policies"]["none"]["kl_mean"]
        lines += ["", f"Simulated correction after step 1: {budget['tokens_mean']:.1f} tokens "
                      f"per pair on average ({budget['budget_share_of_reused']:.0%} of the reused "
                      f"tokens), {budget['pairs']} pairs; KL over steps 2..",
                  "", "| policy | KL mean | share of kvshare's KL removed |", "|---|---:|---:|"]
        for name, row in budget["policies"].items():
            removed = 1 - row["kl_mean"] / none if none else None
            lines.append(f"| {name} | {row['kl_mean']:.5f} | {_cell(removed, '.1%')} |")
    return "\n".join(lines) + "\n"


def _smooth(values: Sequence[float | None], width: int = 8) -> list[float]:
    """Trailing mean over ``width`` steps: per-step KL of a few dozen pairs is spiky."""
    clean = [math.nan if v is None else v for v in values]
    return [float(np.nanmean(clean[max(0, i - width + 1):i + 1])) for i in range(len(clean))]


def plot(results: dict, path: Path) -> None:
    """Four panels: KL per step; approx shares per layer (prefill vs decode); recall per
    layer against the deviation baseline; correction KL per step by policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    per_step = results["per_step"]
    steps = range(len(per_step["kl_mean"]))
    ax = axes[0, 0]
    ax.plot(steps, per_step["kl_mean"], color="C0", alpha=0.35, label="mean")
    ax.plot(steps, _smooth(per_step["kl_mean"]), color="C0", label="mean, 8-step trailing")
    ax.plot(steps, per_step["kl_median"], color="C1", alpha=0.35, label="median")
    ax.plot(steps, _smooth(per_step["kl_median"]), color="C1", label="median, 8-step trailing")
    ax.set(xlabel="decode step (0: the prompt's last token)", ylabel="KL(full || kvshare), nats",
           title="next-token KL per decode step")
    ax.set_yscale("log")
    ax.legend()

    everything = results["layers"]["all"]
    layers = range(len(everything["decode_tv"]))
    ax = axes[0, 1]
    ax.plot(layers, everything["approx_share_prefill"], "o-", label="prefill (full)")
    ax.plot(layers, everything["approx_share_decode"], "s-", label="decode (full)")
    ax.plot(layers, everything["approx_share_decode_kvshare"], "^-", label="decode (kvshare)")
    ax.set(xlabel="layer", ylabel="share of prompt attention",
           title="attention on reused, not recomputed (approx) tokens")
    ax.legend()

    ax = axes[1, 0]
    base = results["baselines"]
    ax.plot(layers, everything["error_recall"], "o-", label="decode attention: K/V error")
    ax.plot(layers, everything["weighted_error_recall"], "s-",
            label="decode attention: decode-weighted error")
    ax.axhline(base["deviation_error_recall"], color="C0", ls="--",
               label="DHD deviation: K/V error")
    ax.axhline(base["deviation_weighted_error_recall"], color="C1", ls="--",
               label="DHD deviation: weighted error")
    ax.axhline(base["random_recall"], color="grey", ls=":", label="random")
    ax.set(xlabel="layer scored", ylabel="recall@5% of approx tokens",
           title="finding the approx tokens with the largest error")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    budget = max(results["corrections"].values(), key=lambda b: b["budget_share_of_reused"],
                 default=None)
    if budget is not None:
        names = ["none", "deviation", "decode_attention@mean", "attention_x_deviation@mean",
                 "oracle_error"]
        for name in (n for n in names if n in budget["policies"]):
            row = budget["policies"][name]["kl_per_step"]
            ax.plot(range(2, len(row) + 2), _smooth(row), label=name)
        ax.set(xlabel="decode step", ylabel="KL(full || system), nats (8-step mean)",
               yscale="log", title=f"correction after step 1, "
                                   f"{budget['budget_share_of_reused']:.0%} of reused tokens")
        ax.legend(fontsize=7)
    fig.suptitle(f"Decode drift, {results['pairs']} pairs, seed {results['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
