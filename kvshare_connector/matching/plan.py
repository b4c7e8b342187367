"""Reuse plan: which target tokens take their KV from which cached entry, and which are computed.

Positions are token indices (0-based) into the target prompt; lengths are in tokens.
`kvshare.matching.align.plan_reuse` builds plans; the connector and the recompute engine
read them. A `ReusePlan` checks its own structure when it is built (cheap: O(runs) plus one
pass over ``num_tokens``); token equality needs the sequences and is checked by
`ReusePlan.check`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ReuseRun:
    """Target positions ``[dst_start, dst_start + length)`` reuse the KV of source positions
    ``[src_start, src_start + length)`` of entry ``entry_id``.

    Invariant: ``target[dst_start + i] == source[src_start + i]`` for all ``i < length``.
    """

    dst_start: int
    """First target position reused."""
    entry_id: str
    """The cached entry the KV comes from."""
    src_start: int
    """First source position (in that entry's token ids)."""
    length: int
    """Tokens in the run (> 0)."""

    @property
    def dst_end(self) -> int:
        """One past the last target position reused."""
        return self.dst_start + self.length

    @property
    def is_exact_prefix(self) -> bool:
        """The run is a shared prefix (target 0.. from source 0..): its KV is exact."""
        return self.dst_start == 0 and self.src_start == 0


@dataclass(frozen=True)
class Candidate:
    """A cached entry offered to the planner: its id and its token ids."""

    entry_id: str
    token_ids: Sequence[int]
    """List, tuple or 1-D integer ``np.ndarray``; an array avoids a conversion per call."""


@dataclass
class ReusePlan:
    """How to fill the KV of a ``num_tokens``-token prompt.

    Invariants (checked in ``__post_init__``):
      - ``runs`` are sorted by ``dst_start``, non-overlapping, inside ``[0, num_tokens)``;
      - every position is in exactly one run or in ``recompute``, never both;
      - the last position ``num_tokens - 1`` is in ``recompute`` (vLLM computes at least one
        token);
      - a run starting at target 0 is an exact prefix (source 0); every other run is preceded
        by a recomputed position: the boundary token whose KV in the source was computed
        after different preceding tokens.
    """

    num_tokens: int
    runs: list[ReuseRun]
    """Sorted by ``dst_start``; non-overlapping."""
    recompute: np.ndarray = field(repr=False)
    """Sorted ``int32`` target positions covered by no run: placeholders (inserted or
    replaced tokens), run-boundary tokens and the last prompt token."""

    def __post_init__(self) -> None:
        self.recompute = np.asarray(self.recompute, dtype=np.int32)
        n = self.num_tokens
        if n < 0:
            raise ValueError(f"num_tokens must be >= 0, got {n}")
        covered = np.zeros(n, dtype=bool)
        prev_end = 0
        for run in self.runs:
            if run.length <= 0 or run.src_start < 0:
                raise ValueError(f"{run}: length must be > 0 and src_start >= 0")
            if run.dst_start < prev_end or run.dst_end > n:
                raise ValueError(
                    f"{run}: runs must be sorted, non-overlapping and end by {n}; "
                    f"previous run ended at {prev_end}"
                )
            if run.dst_start == 0 and not run.is_exact_prefix:
                raise ValueError(f"{run}: a run at target 0 must start at source 0")
            if run.dst_start > 0 and run.dst_start == prev_end:
                raise ValueError(f"{run}: its boundary token {run.dst_start - 1} is not recomputed")
            covered[run.dst_start : run.dst_end] = True
            prev_end = run.dst_end
        expected = np.flatnonzero(~covered)
        if not np.array_equal(self.recompute, expected):
            raise ValueError(
                f"recompute must be exactly the {expected.size} positions no run covers, "
                f"got {self.recompute.size} positions"
            )
        if n > 0 and covered[n - 1]:
            raise ValueError(f"the last prompt token ({n - 1}) must be recomputed")

    @classmethod
    def no_reuse(cls, num_tokens: int) -> ReusePlan:
        """Compute every token (a miss)."""
        return cls(num_tokens, [], np.arange(num_tokens, dtype=np.int32))

    @property
    def reused_tokens(self) -> int:
        """Tokens whose KV comes from a cached entry."""
        return sum(run.length for run in self.runs)

    @property
    def recompute_tokens(self) -> int:
        """Tokens that must be computed (``num_tokens - reused_tokens``)."""
        return int(self.recompute.size)

    @property
    def reuse_fraction(self) -> float:
        """``reused_tokens / num_tokens``; 0.0 for an empty prompt."""
        return self.reused_tokens / self.num_tokens if self.num_tokens else 0.0

    @property
    def source_entries(self) -> tuple[str, ...]:
        """Entry ids the runs read from, in order of first use."""
        return tuple(dict.fromkeys(run.entry_id for run in self.runs))

    def check(self, target: Sequence[int], candidates: Sequence[Candidate]) -> None:
        """Raise ``ValueError`` unless every run maps equal tokens of a given candidate.

        Costs O(reused tokens). `plan_reuse` makes the same comparison before it returns.
        """
        if len(target) != self.num_tokens:
            raise ValueError(f"plan is for {self.num_tokens} tokens, target has {len(target)}")
        sources = {c.entry_id: c.token_ids for c in candidates}
        arrays: dict[str, np.ndarray] = {}
        tgt = np.asarray(target)
        for run in self.runs:
            if run.entry_id not in sources:
                raise ValueError(f"{run}: entry {run.entry_id!r} is not among the candidates")
            if run.entry_id not in arrays:
                arrays[run.entry_id] = np.asarray(sources[run.entry_id])
            src = arrays[run.entry_id]
            if run.src_start + run.length > len(src):
                raise ValueError(f"{run}: runs past the end of its source ({len(src)} tokens)")
            if not np.array_equal(
                tgt[run.dst_start : run.dst_end], src[run.src_start : run.src_start + run.length]
            ):
                raise ValueError(f"{run}: target and source tokens differ")
