"""Token alignment of a prompt against cached candidates, and the reuse plan it yields.

`plan_reuse` finds every maximal exact match (MEM) of at least ``min(8, min_run_tokens)``
tokens between the target and any candidate, at any offset (so moved blocks and repeated
text count), then walks the target left to right and at each position takes the match that
reaches furthest (LZ77-style greedy parsing against all candidates at once). Each piece
costs one recomputed boundary token, so reaching furthest means fewest pieces and fewest
recomputed tokens. `equal_runs` is the plain LCS alignment of one pair, for oracles.
Design, worked example and measurements: ``docs/matching.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from rapidfuzz.distance import Indel

from kvshare.matching.plan import Candidate, ReusePlan, ReuseRun

SEED_TOKENS = 8
"""Length (tokens) of the k-grams that seed matches; capped at ``min_run_tokens``."""
SEED_HITS_PER_CANDIDATE = 4
"""A k-gram seen more often than this per candidate (on average) is frequent and seeds
sparsely (see `_seed_pairs`): it bounds the work on highly repetitive text."""
_MIN_SEED_HITS = 16
_FREQUENT_TARGET_STRIDE = 64
_COMPARE_BUDGET = 1 << 15  # token pairs compared per block pass of _common_length
_MAX_BLOCK_PASSES = 32  # so at most ~1M token pairs per walk set, even on degenerate text

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_POLY = 0x100000001B3


def equal_runs(target: Sequence[int], source: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(dst_start, src_start, length)`` of the equal blocks of one LCS (Indel) alignment.

    The plain alignment, untrimmed and unfiltered (blocks of one token included), in target
    order; ``target[dst_start + i] == source[src_start + i]`` for ``i < length``. Uses
    rapidfuzz's bit-parallel LCS: O(n * m / 64) time and memory, about 0.3-0.7 s and
    130 MB for 32k x 32k tokens here, so keep it for oracles and tests, not lookups.
    """
    ops = Indel.opcodes(_as_list(target), _as_list(source))
    return [
        (op.src_start, op.dest_start, op.src_end - op.src_start) for op in ops if op.tag == "equal"
    ]


def plan_reuse(
    target: Sequence[int], candidates: Sequence[Candidate], *, min_run_tokens: int = 8
) -> ReusePlan:
    """Plan which tokens of ``target`` reuse KV from ``candidates`` and which are computed.

    Runs may come from several candidates and from any source offset. Guarantees (besides
    the structural invariants that `ReusePlan` checks):
      - every run maps equal tokens of the candidate it names and lies inside it;
      - every run is at least ``min_run_tokens`` long;
      - every run is the tail of an exact match whose first token is recomputed (that token's
        KV was computed after other preceding tokens), except a run at target 0 from source
        0: an exact prefix, reused whole; so an identical prompt reuses all but its last token;
      - only the candidates' entry ids appear; earlier candidates win ties.
    Prompts shorter than two tokens reuse nothing.
    """
    if min_run_tokens < 1:
        raise ValueError(f"min_run_tokens must be >= 1, got {min_run_tokens}")
    ids = [c.entry_id for c in candidates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"candidate entry ids must be unique, got {ids}")
    tokens = _as_array(target, "target")
    n = int(tokens.size)
    k = min(SEED_TOKENS, min_run_tokens)
    # Any useful match has >= min_run_tokens + 1 tokens (the first is recomputed), so one
    # seed every `stride` source positions still lands inside it.
    stride = max(1, min(k, min_run_tokens + 2 - k))
    if n - 1 < min_run_tokens or not candidates:
        return ReusePlan.no_reuse(n)
    src = _Sources.of(candidates)
    # The last token is always computed, so matches may only cover target[: n - 1].
    mems = _maximal_matches(tokens[: n - 1], src, k, stride)
    runs = _greedy_runs(mems, src, min_run_tokens)
    return _build_plan(n, _verified(runs, tokens, src), ids)


@dataclass(frozen=True)
class _Sources:
    """The candidates' token ids end to end; candidate ``c`` is
    ``tokens[start[c] : end[c]]``."""

    tokens: np.ndarray
    start: np.ndarray
    end: np.ndarray
    lengths: np.ndarray

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> _Sources:
        arrays = [_as_array(c.token_ids, f"candidate {c.entry_id!r}") for c in candidates]
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        end = lengths.cumsum()
        return cls(np.concatenate(arrays), end - lengths, end, lengths)


def _maximal_matches(
    target: np.ndarray, src: _Sources, k: int, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact matches between ``target`` and the candidates.

    Returns ``(dst_start, dst_end, src_start, candidate)`` arrays; ``src_start`` is global
    (into ``src.tokens``). Each match is maximal on its diagonal and listed once, except
    where the compare budget truncated a walk through highly repetitive text. Every match of
    at least ``k + stride - 1`` tokens holds a k-gram that starts at a multiple of
    ``stride`` in its candidate, so it is found. Hash equality only proposes seeds; match
    ends are measured by comparing tokens and `_verified` checks the interiors.
    """
    empty = np.zeros(0, dtype=np.int64)
    nt = target.size - k + 1
    per_cand = np.maximum(0, (src.lengths - k) // stride + 1)
    if nt <= 0 or per_cand.sum() == 0:
        return empty, empty, empty, empty
    # Source seeds: the k-grams at every stride-th position of each candidate.
    seed_cand = np.arange(src.lengths.size).repeat(per_cand)
    first = per_cand.cumsum() - per_cand
    seed_pos = src.start[seed_cand] + (np.arange(seed_cand.size) - first[seed_cand]) * stride
    ht = _gram_hashes(target, k)
    hs = _gram_hashes(src.tokens, k)[seed_pos]
    i, si, rare = _seed_pairs(ht, hs, seed_cand, src.lengths.size)
    if i.size == 0:
        return empty, empty, empty, empty

    # Rare pairs (i, seed), (i + stride, seed + 1), ... chain into one proposed match; pairs
    # of too-frequent grams stand alone. Sorted by (diagonal, i), heads and tails pair up.
    c = seed_cand[si]
    last = first + per_cand - 1
    ip, sp = np.maximum(i - stride, 0), np.maximum(si - 1, 0)
    linked_prev = rare[si] & rare[sp] & (si > first[c]) & (i >= stride) & (ht[ip] == hs[sp])
    inx, snx = np.minimum(i + stride, nt - 1), np.minimum(si + 1, hs.size - 1)
    linked_next = rare[si] & rare[snx] & (si < last[c]) & (i + stride < nt) & (ht[inx] == hs[snx])
    n = target.size
    diag = seed_pos[si] - i
    key = (diag + n) * (n + 1) + i
    heads = (~linked_prev).nonzero()[0]
    heads = heads[key[heads].argsort()]
    tails = (~linked_next).nonzero()[0]
    tails = tails[key[tails].argsort()]
    start, d, c = i[heads], diag[heads], c[heads]
    end = i[tails] + k

    # Measure how far each match really runs past its last gram (up to stride - 1 tokens,
    # or through grams too frequent to seed), stopping at the next chain on the same
    # diagonal: reaching it merges the two.
    next_same = np.zeros(start.size, dtype=bool)
    next_same[:-1] = (d[1:] == d[:-1]) & (c[1:] == c[:-1])  # global diagonals span candidates
    gap = np.full(start.size, n)
    gap[:-1] = np.where(next_same[:-1], np.maximum(start[1:] - end[:-1], 0), n)  # 0: overlap
    limit = np.minimum(np.minimum(n - end, src.end[c] - (end + d)), gap)
    right = _common_length(target, src.tokens, end, end + d, limit, 1)
    merged_into_next = next_same & (right == gap)
    keep = np.ones(start.size, dtype=bool)
    keep[1:] = ~merged_into_next[:-1]
    firsts = keep.nonzero()[0]
    end = np.maximum.reduceat(end + right, firsts)
    start, d, c = start[firsts], d[firsts], c[firsts]
    room = np.minimum(start, start + d - src.start[c])
    left = _common_length(target, src.tokens, start - 1, start + d - 1, room, -1)
    return start - left, end, start + d - left, c


def _seed_pairs(
    ht: np.ndarray, hs: np.ndarray, seed_cand: np.ndarray, num_candidates: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, seed)`` pairs with equal gram hashes, and per seed whether its gram is rare.

    Target grams go into a direct-address table (>= 4 slots per gram, high hash bits) that
    every source seed probes: no sort of the larger source side. A gram seen more than
    ``max(16, SEED_HITS_PER_CANDIDATE * candidates)`` times among the seeds is frequent
    (runs of one token, table rules, repeated paragraphs): it keeps only its first seed per
    candidate, paired with target positions at frequent-stretch starts and every
    ``_FREQUENT_TARGET_STRIDE`` tokens, which bounds the pairs without losing such text.
    """
    nt = ht.size
    bits = max(4, (4 * nt - 1).bit_length())
    size = 1 << bits
    bt = (ht >> np.uint64(64 - bits)).astype(np.uint16 if bits <= 16 else np.int64)
    count_t = np.bincount(bt, minlength=size)
    order_t = bt.argsort(kind="stable")
    first_t = count_t.cumsum() - count_t
    bs = (hs >> np.uint64(64 - bits)).astype(np.int64)
    count_s = np.bincount(bs, minlength=size)
    max_hits = max(_MIN_SEED_HITS, SEED_HITS_PER_CANDIDATE * num_candidates)
    rare = count_s[bs] <= max_hits
    in_target = count_t[bs] > 0
    probes = (rare & in_target).nonzero()[0]
    frequent = (~rare & in_target).nonzero()[0]
    if frequent.size:
        gram_in_cand = hs[frequent] ^ (seed_cand[frequent].astype(np.uint64) * _M1)
        frequent = frequent[np.unique(gram_in_cand, return_index=True)[1]]
        probes = np.concatenate([probes, frequent])
    per_probe = count_t[bs[probes]]
    total = int(per_probe.sum())
    si = probes.repeat(per_probe)
    offset = (first_t[bs[probes]] - (per_probe.cumsum() - per_probe)).repeat(per_probe)
    i = order_t[offset + np.arange(total)]
    same = ht[i] == hs[si]
    i, si = i[same], si[same]
    if frequent.size:
        t_frequent = count_s[bt] > max_hits
        stretch_start = t_frequent.copy()
        stretch_start[1:] &= ~t_frequent[:-1]
        sampled = stretch_start | (t_frequent & (np.arange(nt) % _FREQUENT_TARGET_STRIDE == 0))
        keep = rare[si] | sampled[i]
        i, si = i[keep], si[keep]
    return i, si, rare


def _greedy_runs(
    mems: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], src: _Sources, min_run: int
) -> list[tuple[int, int, int, int]]:
    """Pick pieces of matches left to right: ``(dst, candidate, src_local, length)`` runs.

    Exact prefix first (reused whole), then at each position the match that reaches
    furthest; the piece's first token is recomputed and pieces shorter than ``min_run``
    after that trim are skipped. Ties go to the earlier candidate.
    """
    starts, ends, srcs, cands = mems
    num_candidates = src.lengths.size
    runs: list[tuple[int, int, int, int]] = []
    if starts.size == 0:
        return runs
    pos = 0
    prefix = ((starts == 0) & (srcs == src.start[cands])).nonzero()[0]
    if prefix.size:
        best = prefix[np.lexsort((cands[prefix], -ends[prefix]))[0]]
        if ends[best] >= min_run:
            runs.append((0, int(cands[best]), 0, int(ends[best])))
            pos = int(ends[best])

    # Matches by start; best[a] is the furthest-reaching of the first a + 1 (ties: earlier
    # candidate). Between two match starts the reach is constant, so a piece can only begin
    # where the previous one ended or at a match start.
    num = starts.size
    order = starts.argsort(kind="stable")
    s_sorted = starts[order]
    key = (ends[order] * num_candidates + (num_candidates - 1 - cands[order])) * num
    best = order[np.maximum.accumulate(key + np.arange(num)) % num]
    reach = ends[best]
    ok = (reach - s_sorted > min_run).nonzero()[0]  # trimmed piece is long enough
    while True:
        at = int(s_sorted.searchsorted(pos, side="right")) - 1
        if at < 0 or reach[at] - pos <= min_run:
            nxt = int(ok.searchsorted(at + 1))
            if nxt == ok.size:
                break
            pos = int(s_sorted[ok[nxt]])
            at = int(s_sorted.searchsorted(pos, side="right")) - 1
        m = int(best[at])
        c = int(cands[m])
        at_src = int(srcs[m] + (pos - starts[m]) - src.start[c])
        end = int(ends[m])
        runs.append((pos + 1, c, at_src + 1, end - pos - 1))
        pos = end
    return runs


def _verified(
    runs: list[tuple[int, int, int, int]], target: np.ndarray, src: _Sources
) -> list[tuple[int, int, int, int]]:
    """The runs whose tokens, and trimmed boundary token, really are equal. Match interiors
    were proven by 64-bit hashes only; a run that fails (a collision, never seen on real
    data) is dropped, i.e. recomputed."""
    if not runs:
        return runs
    dst, cand, at_src, length = (np.array(col, dtype=np.int64) for col in zip(*runs))
    trimmed = (dst > 0).astype(np.int64)  # runs other than an exact prefix
    dst, at_src, length = dst - trimmed, at_src - trimmed, length + trimmed
    firsts = length.cumsum() - length
    offsets = np.arange(int(length.sum())) - firsts.repeat(length)
    equal = (
        target[dst.repeat(length) + offsets]
        == src.tokens[(src.start[cand] + at_src).repeat(length) + offsets]
    )
    ok = np.logical_and.reduceat(equal, firsts)
    return runs if ok.all() else [run for run, good in zip(runs, ok) if good]


def _build_plan(n: int, runs: list[tuple[int, int, int, int]], ids: list[str]) -> ReusePlan:
    covered = np.zeros(n, dtype=bool)
    out = []
    for dst, c, src, length in runs:
        covered[dst : dst + length] = True
        out.append(ReuseRun(dst, ids[c], src, length))
    return ReusePlan(n, out, (~covered).nonzero()[0].astype(np.int32))


def _common_length(
    x: np.ndarray, y: np.ndarray, px: np.ndarray, py: np.ndarray, limit: np.ndarray, step: int
) -> np.ndarray:
    """How many tokens ``x`` and ``y`` share walking from ``px`` / ``py`` by ``step`` (+1 or
    -1), at most ``limit`` each. Most walks here stop within a token or two, so the first
    passes compare one token per walk; walks still going then compare blocks that grow 8x
    per pass (within a budget), so long walks take few passes. After
    ``_MAX_BLOCK_PASSES`` block passes the walks still going stop where they are (shorter
    but still exact matches): that bounds the work on degenerate, highly repetitive text."""
    out = np.zeros(px.size, dtype=np.int64)
    active = (limit > 0).nonzero()[0]
    for _ in range(2):
        if not active.size:
            return out
        at = out[active] * step
        same = x[px[active] + at] == y[py[active] + at]
        out[active] += same
        active = active[same & (limit[active] > out[active])]
    width = 8
    for _ in range(_MAX_BLOCK_PASSES):
        if not active.size:
            break
        left = limit[active] - out[active]
        w = int(min(left.max(), width))
        span = np.arange(w)
        moved = (out[active, None] + span) * step
        ix = np.clip(px[active, None] + moved, 0, x.size - 1)
        iy = np.clip(py[active, None] + moved, 0, y.size - 1)
        equal = (x[ix] == y[iy]) & (span < left[:, None])
        good = np.where(equal.all(axis=1), w, equal.argmin(axis=1))
        out[active] += good
        active = active[(good == w) & (left > w)]
        width = max(8, min(width * 8, _COMPARE_BUDGET // max(active.size, 1)))
    return out


def _gram_hashes(tokens: np.ndarray, k: int) -> np.ndarray:
    """64-bit hash of every k-gram (``tokens.size - k + 1`` values): a polynomial over the
    window of multiplied token ids, built by doubling widths. Its high bits are the well
    mixed ones. Weak against crafted inputs, which is fine: matches are verified."""
    x = (tokens.astype(np.uint64) + _GOLDEN) * _M1
    acc, acc_width = None, 0
    block, width = x, 1  # block[i] hashes tokens[i : i + width]
    while True:
        if k & width:
            if acc is None:
                acc, acc_width = block, width
            else:
                keep = acc.size - width
                acc = acc[:keep] * _poly_pow(width) + block[acc_width : acc_width + keep]
                acc_width += width
        if width * 2 > k:
            return acc
        block = block[: block.size - width] * _poly_pow(width) + block[width:]
        width *= 2


@cache
def _poly_pow(width: int) -> np.uint64:
    return np.uint64(pow(_POLY, width, 1 << 64))


def _as_array(tokens: Sequence[int], what: str) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(
            f"{what}: token ids must be a 1-D sequence of ints, got {arr.dtype} {arr.shape}"
        )
    return arr.astype(np.int64, copy=False)


def _as_list(tokens: Sequence[int]) -> Sequence[int]:
    return tokens.tolist() if isinstance(tokens, np.ndarray) else tokens
