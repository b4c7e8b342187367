"""The claim rule: which prompt positions the connector fills, given a reuse plan.

One rule, shared by the connector's scheduler half, ``kvshare inspect plan`` and the
``connector`` policy of ``kvshare bench hitrate``, so that what they report is what the
connector does.

vLLM computes a prompt's positions ``[0, num_computed)`` from its own prefix cache
(block aligned) and must compute at least the last prompt token itself. kvshare claims
``[num_computed, end)`` and vLLM prefills ``[end, num_tokens)`` attending to the claimed
KV. With ``recompute_tail_by == "vllm"`` the claim stops ``recompute_tail_tokens`` before
the last token, so vLLM prefills the prompt's tail (the end of the user turn and the
chat template's generation prompt) in one multi-token step, as it would after a prefix
hit; with ``"kvshare"`` the claim runs to the last token and the fill recomputes the tail.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvshare.config import KVShareConfig
from kvshare.matching.plan import ReusePlan, ReuseRun
from kvshare.storage.index import IndexEntry


@dataclass(frozen=True)
class Claim:
    """Positions ``[start, end)`` of a prompt that kvshare fills (``start == end``: none)."""

    start: int
    """vLLM's own prefix-cache hit in tokens (block aligned); kvshare never writes below."""
    end: int
    """One past the last claimed position."""
    planned_reuse: int
    """Claimed positions the plan takes from cached entries (the rest are placeholders,
    boundaries or the kvshare-computed tail). DHD recomputes a share of them too."""
    verbatim: int = 0
    """Of those, the leading ones from ``start`` that copy their source's exact prefix at
    the same positions (:func:`exact_prefix_end`): the prompt's own KV, bit for bit, so
    the fill loads them and never recomputes them."""

    @property
    def num_claimed(self) -> int:
        return self.end - self.start

    @property
    def verbatim_end(self) -> int:
        """One past the last verbatim position (``start`` when there are none)."""
        return self.start + self.verbatim

    def expected_reused(self, rho: float) -> int:
        """Claimed tokens loaded and not recomputed when every chunk is found: the plan's
        reuse minus DHD's ``rho`` share of its non-verbatim part (rounded as the recompute
        engine rounds)."""
        return self.planned_reuse - round(rho * (self.planned_reuse - self.verbatim))


def claim_end(num_tokens: int, config: KVShareConfig) -> int:
    """One past the last position kvshare may fill in a ``num_tokens``-token prompt."""
    tail = config.recompute_tail_tokens if config.recompute_tail_by == "vllm" else 0
    return max(0, num_tokens - 1 - tail)


def tail_start(num_tokens: int, config: KVShareConfig) -> int:
    """First position of the prompt's tail, which is always computed (by vLLM or kvshare)."""
    return max(0, num_tokens - 1 - config.recompute_tail_tokens)


def decide_claim(plan: ReusePlan, num_computed: int, config: KVShareConfig,
                 sources: Mapping[str, IndexEntry] | None = None) -> Claim:
    """The claim the connector makes for ``plan`` after vLLM's prefix hit of ``num_computed``.

    Nothing is claimed when the plan reuses less than ``min_reuse_fraction`` of the prompt
    or fewer than ``min_reuse_tokens`` tokens, or when none of its reuse lies in the
    claimable range (vLLM's own hit already covers it). ``sources`` (the plan's entries by
    id) tell which claimed positions are verbatim; without them none are.
    """
    empty = Claim(num_computed, num_computed, 0)
    if (plan.reuse_fraction < config.min_reuse_fraction
            or plan.reused_tokens < config.min_reuse_tokens):
        return empty
    end = claim_end(plan.num_tokens, config)
    reuse_end = min(end, tail_start(plan.num_tokens, config))
    planned = sum(max(0, min(run.dst_end, reuse_end) - max(run.dst_start, num_computed))
                  for run in plan.runs)
    if end <= num_computed or planned == 0:
        return empty
    verbatim = (max(0, min(exact_prefix_end(plan, sources), reuse_end) - num_computed)
                if sources is not None else 0)
    return Claim(num_computed, end, planned, verbatim)


def exact_prefix_end(plan: ReusePlan, sources: Mapping[str, IndexEntry]) -> int:
    """One past the last prompt position whose cached KV is the prompt's own: the plan's
    exact-prefix run (the same tokens from position 0, at the same positions) inside its
    source's exact prefix. Causal attention makes those rows depend on nothing else, so
    they are what the prompt's own prefill computes, as vLLM's prefix cache assumes.
    0 without such a run."""
    prefix = plan.runs[0] if plan.runs and plan.runs[0].is_exact_prefix else None
    if prefix is None:
        return 0
    return min(prefix.dst_end, sources[prefix.entry_id].exact_prefix)


def claimed_runs(plan: ReusePlan, claim: Claim) -> list[ReuseRun]:
    """The plan's runs cut to the claim ``[start, end)``: what the connector loads."""
    runs = []
    for run in plan.runs:
        skip = max(0, claim.start - run.dst_start)
        length = min(run.dst_end, claim.end) - run.dst_start - skip
        if length > 0:
            runs.append(ReuseRun(run.dst_start + skip, run.entry_id, run.src_start + skip,
                                 length))
    return runs


def read_depth(run: ReuseRun, source: IndexEntry) -> int:
    """Approximation depth of the source rows a run reads (0 inside the exact prefix)."""
    return 0 if run.src_start + run.length <= source.exact_prefix else source.depth


def kv_origin(claim: Claim, plan: ReusePlan, sources: Mapping[str, IndexEntry],
              exact_tokens: int, depth: int) -> tuple[int, int]:
    """(exact leading tokens, approximation depth) of a prompt's KV after its request.

    ``exact_tokens`` and ``depth`` describe the KV without the claim: all tokens and 0,
    unless vLLM's prefix hit held approximate blocks (then the hit's exact leading tokens
    and its deepest block's depth; vLLM computes the rest on top of them).

    Claimed rows are exact while they continue the plan's exact-prefix run (the same
    tokens before, at the same positions) inside its source's exact prefix; if that covers
    the whole claim, so is everything vLLM computes after it. Otherwise the prompt is
    approximate from there on: depth 1 + the deepest source whose approximate rows it
    loads (rows inside a source's exact prefix count as exact).
    """
    runs = claimed_runs(plan, claim)
    if not runs:
        return exact_tokens, depth
    exact_claimed = max(claim.start, exact_prefix_end(plan, sources))
    if exact_claimed >= claim.end:
        return exact_tokens, depth
    source_depth = max(read_depth(run, sources[run.entry_id]) for run in runs)
    return min(exact_tokens, exact_claimed), max(depth, 1 + source_depth)
