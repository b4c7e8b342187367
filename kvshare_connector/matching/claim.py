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

from dataclasses import dataclass

from kvshare.config import KVShareConfig
from kvshare.matching.plan import ReusePlan


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

    @property
    def num_claimed(self) -> int:
        return self.end - self.start

    def expected_reused(self, rho: float) -> int:
        """Claimed tokens loaded and not recomputed when every chunk is found: the plan's
        reuse minus DHD's ``rho`` share of it (rounded as the recompute engine rounds)."""
        return self.planned_reuse - round(rho * self.planned_reuse)


def claim_end(num_tokens: int, config: KVShareConfig) -> int:
    """One past the last position kvshare may fill in a ``num_tokens``-token prompt."""
    tail = config.recompute_tail_tokens if config.recompute_tail_by == "vllm" else 0
    return max(0, num_tokens - 1 - tail)


def tail_start(num_tokens: int, config: KVShareConfig) -> int:
    """First position of the prompt's tail, which is always computed (by vLLM or kvshare)."""
    return max(0, num_tokens - 1 - config.recompute_tail_tokens)


def decide_claim(plan: ReusePlan, num_computed: int, config: KVShareConfig) -> Claim:
    """The claim the connector makes for ``plan`` after vLLM's prefix hit of ``num_computed``.

    Nothing is claimed when the plan reuses less than ``min_reuse_fraction`` of the prompt
    or fewer than ``min_reuse_tokens`` tokens, or when none of its reuse lies in the
    claimable range (vLLM's own hit already covers it).
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
    return Claim(num_computed, end, planned)
