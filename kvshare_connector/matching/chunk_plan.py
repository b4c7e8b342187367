"""CacheBlend / LMCache-style planning: reuse only exact fixed-size chunks.

The baseline kvshare is measured against (``planner: chunk256``): the target is cut into
``chunk_tokens``-token chunks at its own chunk boundaries, and a chunk reuses KV when a
candidate holds the identical chunk at one of *its* chunk boundaries, at any position.
Plans obey the same invariants as `plan_reuse` (boundary token and last token
recomputed), so the connector and the recompute engine treat both planners alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

from kvshare.matching.plan import Candidate, ReusePlan, ReuseRun


def plan_chunk_reuse(
    target: Sequence[int], candidates: Sequence[Candidate], *, chunk_tokens: int = 256
) -> ReusePlan:
    if chunk_tokens < 2:
        raise ValueError(f"chunk_tokens must be >= 2, got {chunk_tokens}")
    tokens = np.asarray(target, dtype=np.int64)
    n = len(tokens)
    where: dict[bytes, tuple[str, int]] = {}
    for candidate in candidates:
        source = np.asarray(candidate.token_ids, dtype=np.int64)
        for start in range(0, len(source) - chunk_tokens + 1, chunk_tokens):
            key = xxhash.xxh3_128_digest(source[start : start + chunk_tokens].tobytes())
            where.setdefault(key, (candidate.entry_id, start))
    runs: list[ReuseRun] = []
    for start in range(0, n - chunk_tokens + 1, chunk_tokens):
        found = where.get(xxhash.xxh3_128_digest(tokens[start : start + chunk_tokens].tobytes()))
        if found is None:
            continue
        entry_id, src = found
        trim = 0 if start == 0 and src == 0 else 1  # an exact prefix needs no boundary token
        length = min(chunk_tokens - trim, n - 1 - (start + trim))
        if length > 0:
            runs.append(ReuseRun(start + trim, entry_id, src + trim, length))
    runs = _merge_exact_prefix_boundaries(runs)
    covered = np.zeros(n, dtype=bool)
    for run in runs:
        covered[run.dst_start : run.dst_end] = True
    return ReusePlan(n, runs, np.flatnonzero(~covered).astype(np.int32))


def _merge_exact_prefix_boundaries(runs: list[ReuseRun]) -> list[ReuseRun]:
    """Consecutive chunks that continue one source contiguously form one run.

    Without this, chunk 1 following an exact-prefix chunk 0 of the same entry would leave
    a needless recomputed token between them (``ReusePlan`` requires a recomputed token
    between adjacent runs).
    """
    merged: list[ReuseRun] = []
    for run in runs:
        if merged:
            last = merged[-1]
            if (last.entry_id == run.entry_id and last.dst_end == run.dst_start - 1
                    and last.src_start + last.length == run.src_start - 1):
                merged[-1] = ReuseRun(last.dst_start, last.entry_id, last.src_start,
                                      last.length + 1 + run.length)
                continue
        merged.append(run)
    return merged
