"""Selective recompute of reused K/V (DHD prefill stage, after CacheBlend).

Given a new prompt and K/V rows reused from similar earlier prompts (already moved to
the new positions with :func:`~kvshare.recompute.rope.rerotate_keys`), the engine runs
the model layer by layer but only for a *tracked* set of positions:

* the initial recompute set from the reuse plan (placeholders, i.e. new or replaced
  tokens, span-boundary tokens, the last token) — their reused rows are garbage;
* at each check layer, the reused tokens whose fresh K/V deviate most from the reused
  rows (``||K_fresh - K_reused|| + ||V_fresh - V_reused||``, L2 over heads x head_dim).

Every tracked token gets fresh Q/K/V at each layer; its K/V overwrite the reused rows
*before* that layer's attention, whose queries (tracked tokens only) see the whole
prompt's K/V, causally by absolute position. Untracked reused tokens keep their reused
rows and need no hidden state. The MLP runs for tracked tokens only.

The check-layer trick. Ranking reused tokens at check layer ``c`` needs their fresh K/V
at ``c``, hence their hidden states at the input of ``c``. The engine therefore tracks
*all* positions through layers ``0 .. c-1`` (a plain full forward of those layers; at
layer 0 the embeddings are exact for everyone) and at layer ``c`` computes Q/K/V for all,
writes those fresh K/V for all (already paid for, and exact), ranks, and keeps only the
initial set plus the top ``rho`` fraction of reused tokens for the attention and MLP of
layer ``c`` and every later layer. With the default ``check_layers=(1,)`` that costs one
full layer plus one full QKV projection out of ``num_layers``. Deviations at layer 0 are
useless (after re-rotation a reused token's layer-0 K/V depend only on its id and
position, so they are all ~0); layer 1 is the first that sees the new context.

Gradual filtering (optional): with several check layers and a non-increasing ``rho``
per check layer, each later check re-ranks the still-tracked reused tokens by their
deviation there and keeps the top ``rho[i]`` fraction (of all reused tokens).

Adaptive budget (optional, ``MassBudget``): instead of a fixed ``rho``, each check keeps
the fewest reused tokens whose scores cover a share of the total score, clamped to
``[rho_min, rho_max]`` of the reused tokens: an edit that changes little (a number)
concentrates the deviation on few tokens and costs little, one that changes what the
prompt is about spreads it and gets more.

Invariants: at every layer, every position whose hidden state is tracked has its K/V row
written fresh at that layer; the tracked set only shrinks, and only at check layers;
initial-set positions are never dropped. ``rho = 1`` tracks everything through every
layer, i.e. a plain full prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from kvshare.recompute.adapter import ModelAdapter

T = TypeVar("T")

SELECT_BY = ("deviation", "attention", "both", "rank", "per_head")
"""How reused tokens are ranked at a check layer: ``deviation`` of their fresh K/V from
the reused rows (CacheBlend, KVShare's DHD); ``attention``, the attention mass the
probes (the prompt's tail) pay them (query-driven, as ProphetKV); ``both``, deviation
times attention mass: a first-order estimate of how much a stale row changes what the
tail reads; ``rank``, a weighted sum of the two scores' rank percentiles
(``attention_weight`` on attention), which no single score's scale can dominate;
``per_head``, the product taken per KV head and summed over heads (a stale row matters
where the heads that read it look). docs/selection.md compares them."""
ATTENTION_WEIGHT = 0.5
"""``rank``'s weight on the attention percentile; 0 ranks by deviation alone (DHD)."""


@dataclass(frozen=True)
class MassBudget:
    """How many reused tokens a check keeps: the fewest whose scores cover ``mass`` of all
    reused tokens' scores, at least ``rho_min`` and at most ``rho_max`` of them."""

    mass: float
    rho_min: float
    rho_max: float

    def __post_init__(self) -> None:
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must lie in (0, 1], got {self.mass}")
        if not 0.0 <= self.rho_min <= self.rho_max <= 1.0:
            raise ValueError(f"need 0 <= rho_min <= rho_max <= 1, got rho_min {self.rho_min} "
                             f"and rho_max {self.rho_max}")

    def tokens(self, scores: torch.Tensor, num_reused: int) -> int:
        """Reused tokens to keep, given the candidates' non-negative ``scores``."""
        low = min(round(self.rho_min * num_reused), scores.numel())
        high = min(round(self.rho_max * num_reused), scores.numel())
        ranked = scores.float().clamp_min(0).sort(descending=True).values
        covered = ranked.cumsum(0)
        if covered.numel() == 0 or covered[-1] <= 0:
            return low
        needed = int(torch.searchsorted(covered, self.mass * covered[-1]).item()) + 1
        return max(low, min(high, needed))


def _attention_mass(probe_q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention mass ``[n]`` that probe queries ``[p, heads, d]`` pay ``keys``
    ``[n, kv_heads, d]``, summed over probes and heads (softmax over these keys only)."""
    return _attention_mass_per_kv_head(probe_q, keys).sum(dim=1)


def _attention_mass_per_kv_head(probe_q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """:func:`_attention_mass` per KV head, ``[n, kv_heads]``: summed over probes and over
    the query heads that share each KV head."""
    heads, kv_heads = probe_q.shape[1], keys.shape[1]
    keys = keys.float().repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.einsum("phd,nhd->phn", probe_q.float(), keys) / probe_q.shape[-1] ** 0.5
    mass = logits.softmax(dim=-1).sum(dim=0)  # [heads, n]
    return mass.reshape(kv_heads, heads // kv_heads, -1).sum(dim=1).T


def _percentile(score: torch.Tensor) -> torch.Tensor:
    """Each score's rank among ``score`` scaled to [0, 1] (0 the smallest; ties by order)."""
    ranks = torch.empty_like(score)
    ranks[score.argsort(stable=True)] = torch.arange(
        score.numel(), dtype=score.dtype, device=score.device)
    return ranks / max(1, score.numel() - 1)


def run_to_end(steps: Generator[object, None, T]) -> T:
    """Run a step-wise computation (a generator) to its end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@dataclass
class PromptKV:
    """K/V of one prompt for every layer, dense and token-major (row ``i`` = position ``i``).

    Keys are post-RoPE at this prompt's positions, as in a KV cache. This is the layout
    of vLLM's per-layer key/value tensors before they are scattered into paged blocks.
    """

    keys: torch.Tensor
    """``[num_layers, num_tokens, num_kv_heads, head_dim]``."""
    values: torch.Tensor
    """Same shape, dtype and device as ``keys``."""

    @classmethod
    def empty(cls, adapter: ModelAdapter, num_tokens: int, zeroed: bool = True) -> PromptKV:
        """Buffers for ``num_tokens`` positions in ``adapter``'s shape, dtype and device;
        zeroed, or left uninitialized for a caller that fills every row it reads."""
        shape = (adapter.num_layers, num_tokens, adapter.num_kv_heads, adapter.head_dim)
        make = torch.zeros if zeroed else torch.empty
        kw = dict(dtype=adapter.dtype, device=adapter.device)
        return cls(keys=make(shape, **kw), values=make(shape, **kw))

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]


@dataclass
class RecomputeResult:
    """What :meth:`SelectiveRecomputeEngine.prefill` computed."""

    kv: PromptKV
    """The final K/V: the caller's reused buffers, updated in place."""
    tracked: torch.Tensor
    """int64, sorted: positions tracked through the last layer (initial set + DHD picks)."""
    selected: torch.Tensor
    """int64, sorted: reused positions that DHD added (``tracked`` minus the initial set)."""
    rows_recomputed: torch.Tensor
    """int64 ``[num_layers]``: K/V rows written fresh per layer."""
    last_logits: torch.Tensor | None
    """float32 ``[vocab]``: next-token logits after the last position, or ``None`` when
    the last position was not tracked through the last layer (the vLLM path leaves the
    last prompt token out: vLLM computes it itself)."""

    @property
    def recompute_fraction(self) -> float:
        """Fresh K/V rows over all rows (layers x tokens): the share of a full prefill's KV work."""
        return float(self.rows_recomputed.sum()) / (self.kv.keys.shape[0] * self.kv.num_tokens)


class SelectiveRecomputeEngine:
    """Recompute a prompt's K/V selectively on top of reused rows (see module docstring).

    Args:
        adapter: the model, seen as per-layer steps.
        rho: fraction of *reused* tokens (prompt length minus the initial recompute set)
            kept tracked after a check layer; rounded to the nearest token count. A
            float applies to every check layer; a sequence gives one non-increasing value
            per check layer (gradual filtering).
        check_layers: strictly increasing layer indices where reused tokens are ranked.
            Empty means naive reuse: only the initial recompute set is computed.
        select_by: how reused tokens are ranked at a check layer (``SELECT_BY``).
        budget: an adaptive budget that replaces ``rho`` at every check layer.
        attention_weight: ``rank``'s weight in [0, 1] on the attention percentile
            (0: deviation's order, i.e. DHD's picks).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        rho: float | Sequence[float] = 0.15,
        check_layers: Sequence[int] = (1,),
        select_by: str = "deviation",
        budget: MassBudget | None = None,
        attention_weight: float = ATTENTION_WEIGHT,
    ) -> None:
        if select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
        if not 0.0 <= attention_weight <= 1.0:
            raise ValueError(f"attention_weight must lie in [0, 1], got {attention_weight}")
        check_layers = tuple(int(c) for c in check_layers)
        if any(b <= a for a, b in zip(check_layers, check_layers[1:])):
            raise ValueError(f"check_layers must be strictly increasing, got {check_layers}")
        if check_layers and not (0 <= check_layers[0] and check_layers[-1] < adapter.num_layers):
            raise ValueError(
                f"check_layers {check_layers} out of range for a model with "
                f"{adapter.num_layers} layers"
            )
        rhos = (
            tuple(float(r) for r in rho)
            if isinstance(rho, Sequence)
            else (float(rho),) * len(check_layers)
        )
        if len(rhos) != len(check_layers):
            raise ValueError(f"got {len(rhos)} rho values {rhos} for check_layers {check_layers}")
        if any(not 0.0 <= r <= 1.0 for r in rhos) or any(b > a for a, b in zip(rhos, rhos[1:])):
            raise ValueError(
                f"rho must lie in [0, 1] and not increase over check layers, got {rhos}"
            )
        self.adapter = adapter
        self.check_layers = check_layers
        self.rhos = rhos
        self.select_by = select_by
        self.budget = budget
        self.attention_weight = attention_weight

    @property
    def first_reused_layer(self) -> int:
        """The first layer whose reused rows after the exact prefix the engine reads.

        Below the first check layer every position after the exact prefix is tracked, so
        its rows are written fresh before anything reads them (the check-layer trick): a
        loader need not fetch those layers' rows, except the exact prefix's. Without
        check layers every layer reads reused rows.
        """
        return self.check_layers[0] if self.check_layers else 0

    def prefill(
        self,
        token_ids: torch.Tensor | np.ndarray | Sequence[int],
        reused: PromptKV,
        recompute: torch.Tensor | np.ndarray | Sequence[int],
        exact_prefix: int = 0,
        logits: bool = True,
        before_layer: Callable[[int], None] | None = None,
        probe_from: int | None = None,
    ) -> RecomputeResult:
        """Fix ``reused`` in place so it approximates the prompt's own prefill K/V: all of
        :meth:`prefill_layers` at once (see there for the arguments)."""
        return run_to_end(self.prefill_layers(token_ids, reused, recompute, exact_prefix,
                                              logits, before_layer, probe_from))

    @torch.no_grad()
    def prefill_layers(
        self,
        token_ids: torch.Tensor | np.ndarray | Sequence[int],
        reused: PromptKV,
        recompute: torch.Tensor | np.ndarray | Sequence[int],
        exact_prefix: int = 0,
        logits: bool = True,
        before_layer: Callable[[int], None] | None = None,
        probe_from: int | None = None,
    ) -> Generator[int, None, RecomputeResult]:
        """:meth:`prefill` one layer at a time: yields, after each layer it ran to its end,
        the positions that layer computed (its cost in token-layers), and returns the
        :class:`RecomputeResult`. A caller may interleave other work with the model between
        layers (the connector's fills advance a few layers per vLLM step) as long as it
        leaves ``reused`` and the adapter's bound state alone meanwhile.

        Fix ``reused`` in place so it approximates the prompt's own prefill K/V.

        Args:
            token_ids: the new prompt, ``[T]`` token ids.
            reused: K/V for all ``T`` positions, reused rows already re-rotated to their
                new positions; rows in ``recompute`` may hold anything.
            recompute: positions that must be computed (the plan's placeholders,
                span boundaries and usually the last token); any order, duplicates ok.
            exact_prefix: positions below this already hold the prompt's own K/V (vLLM's
                prefix-cache hit). They are attended to but never tracked or ranked:
                their deviation is zero, so recomputing them would only cost time.
            logits: compute the next-token logits after the last position. Without them
                the last layer stops once its K/V rows are written: its attention and MLP
                feed nothing but the logits (vLLM computes the last prompt token itself).
            before_layer: called with each layer's index before the engine reads or
                writes that layer's rows of ``reused``, so rows may still be arriving
                when the prefill starts (the GPU loader makes the compute stream wait
                for that layer's copies here). Layers after an early stop are not
                announced: the caller completes their rows itself.
            probe_from: positions from here on are probes: the prompt's tail, which
                someone else computes afterwards (vLLM, after the connector's fill). They
                are tracked up to the last check layer, where their queries rank the
                reused tokens (``select_by`` ``attention`` and ``both``); their rows at
                later layers are never written. Default: no probes.
        """
        adapter = self.adapter
        tokens = torch.as_tensor(token_ids, dtype=torch.int64, device=adapter.device)
        num_tokens = self._check_inputs(tokens, reused)
        if not 0 <= exact_prefix < num_tokens:
            raise ValueError(
                f"exact_prefix must lie in [0, {num_tokens}) for a prompt of {num_tokens} "
                f"tokens, got {exact_prefix}"
            )
        probe_from = num_tokens if probe_from is None else probe_from
        if not exact_prefix < probe_from <= num_tokens:
            raise ValueError(f"probe_from must lie in ({exact_prefix}, {num_tokens}], "
                             f"got {probe_from}")
        if self.select_by != "deviation" and self.check_layers and probe_from == num_tokens:
            raise ValueError(f"select_by={self.select_by!r} ranks by the probes' attention, "
                             "but there are none: pass probe_from < len(token_ids)")
        initial = self._initial_mask(recompute, num_tokens)
        if initial[:exact_prefix].any() or initial[probe_from:].any():
            outside = initial.clone()
            outside[exact_prefix:probe_from] = False
            raise ValueError(
                f"recompute positions {outside.nonzero().flatten()[:8].tolist()} lie outside "
                f"[{exact_prefix}, {probe_from}): the exact prefix or the probes"
            )
        num_reused = probe_from - exact_prefix - int(initial.sum())
        is_probe = torch.arange(num_tokens, device=adapter.device) >= probe_from

        # Layers before the first check layer run for every position after the exact
        # prefix (see "check-layer trick"), probes included.
        positions = (
            torch.arange(exact_prefix, num_tokens, device=adapter.device)
            if self.check_layers
            else initial.nonzero().flatten()
        )
        # Rows that exist at a layer: the probes' only up to the last check layer.
        written = num_tokens if self.check_layers else probe_from
        # The residual stream of tracked positions, as (pending update, residual).
        update, residual = adapter.embed(tokens[positions]), None
        rows = torch.zeros(adapter.num_layers, dtype=torch.int64)
        checks = dict(zip(self.check_layers, self.rhos))

        for layer in range(adapter.num_layers):
            if positions.numel() == 0:
                break  # nothing tracked: every remaining row stays reused
            if before_layer is not None:
                before_layer(layer)
            x, residual = adapter.input_norm(layer, update, residual)
            q, k, v = adapter.qkv(layer, x)
            q, k = adapter.rope(q, k, positions)
            keep = None
            if layer in checks:
                keep = self._select(
                    q, k, v, reused, layer, positions, initial, is_probe,
                    checks[layer], num_reused, last=layer == self.check_layers[-1],
                )
            reused.keys[layer, positions] = k
            reused.values[layer, positions] = v
            rows[layer] = positions.numel()
            if keep is not None:
                positions, residual, q = positions[keep], residual[keep], q[keep]
                if layer == self.check_layers[-1]:
                    written = probe_from
                if positions.numel() == 0:
                    break  # nothing tracked: every remaining row stays reused
            if layer == adapter.num_layers - 1 and not logits:
                break  # the last layer's K/V are written; its output would only feed logits
            attn = adapter.attention(layer, q, positions, reused.keys[layer, :written],
                                     reused.values[layer, :written])
            x, residual = adapter.post_attention_norm(layer, adapter.o_proj(layer, attn), residual)
            update = adapter.mlp(layer, x)
            yield int(rows[layer])

        last_tracked = (logits and positions.numel() > 0
                        and int(positions[-1]) == num_tokens - 1)
        return RecomputeResult(
            kv=reused,
            tracked=positions,
            selected=positions[~initial[positions]],
            rows_recomputed=rows,
            last_logits=(
                adapter.logits(update[-1:], residual[-1:])[0].float() if last_tracked else None
            ),
        )

    def _select(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        reused: PromptKV,
        layer: int,
        positions: torch.Tensor,
        initial: torch.Tensor,
        is_probe: torch.Tensor,
        rho: float,
        num_reused: int,
        last: bool,
    ) -> torch.Tensor:
        """Row indices into ``positions`` to keep: every initial one, the reused ones that
        rank highest (``rho`` of ``num_reused``, or as many as ``self.budget`` says), and
        the probes unless this is the ``last`` check.

        Must run before the fresh rows overwrite ``reused`` (it reads the reused rows).
        """
        probe = is_probe[positions]
        candidate = ~(initial[positions] | probe)
        # Squared K and V deviation per KV head, [n, kv_heads] each.
        key_sq = (k - reused.keys[layer, positions]).float().square().sum(dim=-1)
        value_sq = (v - reused.values[layer, positions]).float().square().sum(dim=-1)
        # DHD's score: L2 over heads x head_dim, keys plus values.
        score = key_sq.sum(dim=1).sqrt() + value_sq.sum(dim=1).sqrt()
        if self.select_by != "deviation" and probe.any():
            head_deviation = key_sq.sqrt() + value_sq.sqrt()
            attention = _attention_mass_per_kv_head(q[probe], k[candidate])
            score[candidate] = self._combine(score[candidate], head_deviation[candidate],
                                             attention)
        budget = (self.budget.tokens(score[candidate], num_reused) if self.budget is not None
                  else round(rho * num_reused))
        score[~candidate] = torch.inf  # initial rows are garbage; probes wait their turn
        num_keep = min(positions.numel(), int((~candidate).sum()) + budget)
        keep = torch.topk(score, num_keep, sorted=False).indices.sort().values
        return keep[~probe[keep]] if last else keep

    def _combine(self, deviation: torch.Tensor, head_deviation: torch.Tensor,
                 attention: torch.Tensor) -> torch.Tensor:
        """The candidates' scores ``[n]`` by ``select_by``, from DHD's ``deviation``
        ``[n]``, the deviation per KV head and the probes' attention mass per KV head
        (both ``[n, kv_heads]``)."""
        if self.select_by == "attention":
            return attention.sum(dim=1)
        if self.select_by == "both":
            return deviation * attention.sum(dim=1)
        if self.select_by == "per_head":
            return (head_deviation * attention).sum(dim=1)
        weight = self.attention_weight  # "rank"
        return ((1.0 - weight) * _percentile(deviation)
                + weight * _percentile(attention.sum(dim=1)))

    def _check_inputs(self, tokens: torch.Tensor, reused: PromptKV) -> int:
        adapter = self.adapter
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(
                f"token_ids must be a non-empty 1-D sequence, got shape {tuple(tokens.shape)}"
            )
        num_tokens = tokens.numel()
        expected = (adapter.num_layers, num_tokens, adapter.num_kv_heads, adapter.head_dim)
        for name, t in (("keys", reused.keys), ("values", reused.values)):
            if tuple(t.shape) != expected:
                raise ValueError(f"reused.{name} has shape {tuple(t.shape)}, expected {expected}")
            if t.dtype != adapter.dtype or t.device != adapter.device:
                raise ValueError(
                    f"reused.{name} is {t.dtype} on {t.device}, "
                    f"expected {adapter.dtype} on {adapter.device}"
                )
        return num_tokens

    def _initial_mask(
        self, recompute: torch.Tensor | np.ndarray | Sequence[int], num_tokens: int
    ) -> torch.Tensor:
        """bool ``[T]``: True at the positions of the initial recompute set."""
        if isinstance(recompute, torch.Tensor):
            positions = recompute.to(device=self.adapter.device, dtype=torch.int64)
        else:
            positions = torch.as_tensor(
                np.asarray(recompute, dtype=np.int64), device=self.adapter.device
            )
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= num_tokens):
            bad = positions[(positions < 0) | (positions >= num_tokens)]
            raise ValueError(
                f"recompute positions {bad[:8].tolist()} out of range "
                f"for a prompt of {num_tokens} tokens"
            )
        mask = torch.zeros(num_tokens, dtype=torch.bool, device=self.adapter.device)
        mask[positions.flatten()] = True
        return mask
