"""What one request reused, from vLLM's cached-token count and the connector's load report.

"Reused" means loaded and not recomputed, everywhere in the benchmarks:

* vLLM's own prefix-cache hit: ``num_cached_tokens - claimed`` (vLLM counts the
  connector's claim in ``num_cached_tokens``);
* plus the claimed tokens kvshare loaded and did not recompute (the report's ``reused``).

Claimed tokens that kvshare recomputed (placeholders, boundaries, tokens of missing chunks,
DHD's picks, a tail it computes, everything after a fallback) are computed, not reused,
even when their KV was loaded first. *Found* tokens are the ones whose KV a cache held
(prefix hit + the report's ``loaded``), whether or not they were then recomputed: that is
what makes a request a cache hit, not what it saved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RequestReuse:
    """Prompt-token counts of one request; invariant ``reused <= found <= prompt_tokens``."""

    prompt_tokens: int
    prefix_hit: int
    """Tokens vLLM took from its own prefix cache."""
    claimed: int
    """Tokens the connector filled (vLLM skipped them)."""
    loaded: int
    """Claimed tokens whose KV came from kvshare's tiers."""
    recomputed: int
    """Claimed tokens kvshare computed."""
    fallback: bool
    """The selective fill failed and the claim was recomputed in full."""

    @classmethod
    def of(cls, prompt_tokens: int, num_cached_tokens: int,
           report: Mapping[str, Any] | None) -> RequestReuse:
        """Counts of a request of ``prompt_tokens`` tokens that vLLM reported with
        ``num_cached_tokens`` and the connector with ``report`` (None: nothing claimed)."""
        if prompt_tokens <= 0:
            raise ValueError(f"prompt_tokens must be > 0, got {prompt_tokens}")
        report = report or {}
        claimed = int(report.get("claimed", 0))
        loaded = int(report.get("loaded", 0))
        recomputed = int(report.get("recomputed", 0))
        if not 0 <= claimed <= num_cached_tokens <= prompt_tokens:
            raise ValueError(f"need 0 <= claimed ({claimed}) <= num_cached_tokens "
                             f"({num_cached_tokens}) <= prompt_tokens ({prompt_tokens})")
        if not (0 <= loaded <= claimed and 0 <= recomputed <= claimed):
            raise ValueError(f"load report {dict(report)} has loaded or recomputed outside "
                             f"[0, claimed={claimed}]")
        if "reused" in report and int(report["reused"]) != claimed - recomputed:
            raise ValueError(f"load report {dict(report)}: reused != claimed - recomputed")
        return cls(prompt_tokens, num_cached_tokens - claimed, claimed, loaded, recomputed,
                   bool(report.get("fallback", False)))

    @property
    def reused(self) -> int:
        """Prompt tokens loaded and not recomputed: prefix hit + claimed - recomputed."""
        return self.prefix_hit + self.claimed - self.recomputed

    @property
    def found(self) -> int:
        """Prompt tokens whose KV a cache held: prefix hit + loaded."""
        return self.prefix_hit + self.loaded

    @property
    def reused_fraction(self) -> float:
        return self.reused / self.prompt_tokens

    @property
    def found_fraction(self) -> float:
        return self.found / self.prompt_tokens

    @property
    def computed_fraction(self) -> float:
        """Share of the prompt the model computed, by vLLM or by kvshare: 1 - reused."""
        return 1.0 - self.reused_fraction


def count_fallbacks(reports: Iterable[Mapping[str, Any] | None]) -> int:
    """Requests whose load report says the selective fill fell back to full recompute."""
    return sum(bool(report and report.get("fallback")) for report in reports)
