"""Reuse policies replayed by ``kvshare bench hitrate``, all on the same token sequences.

Each policy sees requests in order: ``reuse(request)`` says how many of its tokens it
could serve from what earlier requests left behind, then ``remember(request)`` lets it
keep this one. Baselines model what users would otherwise deploy:

- ``prefix``: vLLM automatic prefix caching (chained hashes of 16-token blocks).
- ``chunk256``: LMCache / CacheBlend exact chunk hashes (256 tokens, any position).
- ``gptcache``: response caching at cosine >= 0.8; a hit "reuses" every token but
  returns an earlier prompt's answer.
- ``oracle`` / ``oracle_lcs``: the most tokens reusable from any single earlier prompt
  among the 20 nearest by embedding (span oracle: equal runs >= 8 tokens, minus one
  boundary token at each end; LCS: every aligned token, reusable by KV or not).

kvshare appears twice:

- ``kvshare``: the plan-level upper bound. Every prompt is indexed and every token the
  planner maps to an earlier prompt counts, whether or not the connector would claim it.
- ``connector``: kvshare as the vLLM connector runs it (:class:`ConnectorPolicy`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import xxhash

from kvshare.bench.cache_models import BlockPool, ChunkTiers, PrefixHit
from kvshare.config import KVShareConfig
from kvshare.matching.align import equal_runs
from kvshare.matching.claim import (
    Claim,
    claim_end,
    claimed_runs,
    decide_claim,
    kv_origin,
    read_depth,
    tail_start,
)
from kvshare.matching.matcher import PUBLIC_SCOPE, LookupResult, Matcher
from kvshare.matching.plan import ReusePlan, ReuseRun
from kvshare.storage.index import IndexEntry, new_entry_id
from kvshare.storage.keys import chunk_keys, chunk_spans


@dataclass(frozen=True)
class Request:
    position: int
    """Index into the workload (its embedding and nearest earlier prompts)."""
    text: str
    token_ids: np.ndarray


class ReusePolicy(Protocol):
    name: str

    def reuse(self, request: Request) -> int:
        """Tokens of ``request`` this policy would not have to prefill."""
        ...

    def remember(self, request: Request) -> None:
        ...


def _max_claim(num_tokens: int) -> int:
    """Every engine computes at least the last prompt token."""
    return max(0, num_tokens - 1)


class PrefixCachePolicy:
    """vLLM automatic prefix caching (:class:`~kvshare.bench.cache_models.BlockPool`);
    ``num_blocks=None``, the ``prefix`` row, never evicts."""

    name = "prefix"

    def __init__(self, block_tokens: int = 16, num_blocks: int | None = None) -> None:
        self.pool = BlockPool(block_tokens, num_blocks)

    def reuse(self, request: Request) -> int:
        return self.pool.lookup(request.token_ids).tokens

    def remember(self, request: Request) -> None:
        hit = self.pool.lookup(request.token_ids)
        self.pool.run(request.token_ids, hit, exact_tokens=len(request.token_ids), depth=0)


class ChunkHashPolicy:
    """LMCache/CacheBlend-style: exact fixed-size chunks matched at any chunk position."""

    name = "chunk256"

    def __init__(self, chunk_tokens: int = 256) -> None:
        self.chunk_tokens = chunk_tokens
        self._chunks: set[bytes] = set()

    def _hashes(self, token_ids: np.ndarray) -> list[bytes]:
        size = self.chunk_tokens
        return [xxhash.xxh3_128_digest(token_ids[s : s + size].tobytes())
                for s in range(0, len(token_ids) - size + 1, size)]

    def reuse(self, request: Request) -> int:
        hits = sum(h in self._chunks for h in self._hashes(request.token_ids))
        return min(hits * self.chunk_tokens, _max_claim(len(request.token_ids)))

    def remember(self, request: Request) -> None:
        self._chunks.update(self._hashes(request.token_ids))


class ResponseCachePolicy:
    """GPTCache-style: serve the nearest earlier prompt's answer if cosine >= threshold."""

    name = "gptcache"

    def __init__(self, nearest_sims: np.ndarray, threshold: float = 0.8) -> None:
        self.nearest_sims = nearest_sims
        self.threshold = threshold

    def reuse(self, request: Request) -> int:
        hit = self.nearest_sims[request.position] >= self.threshold
        return len(request.token_ids) if hit else 0

    def remember(self, request: Request) -> None:
        pass  # the neighbour table already knows every earlier prompt


class SpanOraclePolicy:
    """Best single earlier source among the k nearest, scored on one token alignment."""

    def __init__(self, name: str, neighbours: np.ndarray, token_ids: list[np.ndarray],
                 *, min_run: int = 8, boundary: int = 1, lcs: bool = False) -> None:
        self.name = name
        self.neighbours = neighbours
        self.token_ids = token_ids
        self.min_run = min_run
        self.boundary = boundary
        self.lcs = lcs

    def score(self, target: np.ndarray, source: np.ndarray) -> int:
        runs = equal_runs(target, source)
        if self.lcs:
            return sum(length for _, _, length in runs)
        return sum(length - 2 * self.boundary for _, _, length in runs if length >= self.min_run)

    def reuse(self, request: Request) -> int:
        best = 0
        for j in self.neighbours[request.position]:
            if j >= 0:
                best = max(best, self.score(request.token_ids, self.token_ids[j]))
        return best

    def remember(self, request: Request) -> None:
        pass  # neighbours are precomputed over earlier prompts only


class KVSharePolicy:
    """kvshare's plan-level upper bound: its own lookup (embed + index search + multi-source
    alignment) over every earlier prompt, counting every token the plan reuses.

    No connector rule applies: no claim thresholds, no recomputed tail, no DHD share, no
    capacity, and every prompt is stored as if computed exactly. :class:`ConnectorPolicy`
    applies them.
    """

    name = "kvshare"

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher
        self.lookup_ms: list[float] = []
        self.last_result: LookupResult | None = None

    def reuse(self, request: Request) -> int:
        result = self.matcher.lookup(request.text, request.token_ids)
        self.lookup_ms.append(result.total_ms)
        self.last_result = result
        return result.plan.reused_tokens

    def remember(self, request: Request) -> None:
        embedding = self.last_result.embedding if self.last_result is not None else None
        self.matcher.insert(request.text, request.token_ids, embedding=embedding)


VLLM_CPU_BLOCK_TOKENS = 128
"""vLLM's KV block size on CPU when none is given (``vllm.platforms.cpu``)."""


@dataclass(frozen=True)
class ConnectorOutcome:
    """What the connector did with one request. Counts are prompt tokens."""

    num_tokens: int
    prefix_hit: PrefixHit
    plan_reused: int
    """Tokens the plan maps to stored entries (the plan-level count)."""
    plan_below_hit: int
    """Of ``plan_reused``, tokens below vLLM's prefix hit (vLLM serves them anyway)."""
    claim: Claim
    loaded: int
    """Planned claim tokens (before the tail) whose chunks the tiers still held."""
    reused: int
    """Claimed tokens loaded and not recomputed: ``loaded`` minus DHD's ``rho`` share."""
    source_depth: int | None
    """Deepest approximation among the source rows the claim read (0: all exact); None
    when nothing was claimed."""
    exact_tokens: int
    """Leading tokens of this prompt's KV that are exact after the request."""
    depth: int
    """Approximation depth of this prompt's KV (0: exact)."""
    stored: bool

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens not computed for this request: vLLM's hit plus kvshare's reuse."""
        return self.prefix_hit.tokens + self.reused


@dataclass
class ConnectorStats:
    """Totals over a replay; token counts sum prompt tokens over requests."""

    requests: int = 0
    tokens: int = 0
    claimed: int = 0
    """Requests the connector claimed tokens for."""
    served_from_approximate: int = 0
    """Claimed requests that read rows of approximate KV (an entry of depth >= 1, beyond
    its exact leading tokens)."""
    approximate_prefix_hits: int = 0
    """Requests whose vLLM prefix hit held blocks kvshare had filled approximately."""
    stored_by_depth: Counter = field(default_factory=Counter)
    not_stored_too_deep: int = 0
    """Prompts not stored because their depth exceeded ``max_approx_depth``."""
    entries_dropped: int = 0
    """Entries deleted because a load found their chunks evicted from every tier."""
    plan_tokens: int = 0
    prefix_hit_tokens: int = 0
    reused_tokens: int = 0
    lost_to_thresholds: int = 0
    """Plan tokens above vLLM's hit of plans under min_reuse_fraction / min_reuse_tokens."""
    lost_to_tail: int = 0
    """Plan tokens in the recomputed tail (the last token and ``recompute_tail_tokens``)."""
    lost_to_missing_chunks: int = 0
    """Planned claim tokens whose chunks were evicted from the tiers."""
    lost_to_rho: int = 0
    """Loaded tokens DHD recomputed."""
    prefix_beyond_plan: int = 0
    """vLLM hit tokens the plan did not cover (reuse the plan-level count misses)."""

    def add(self, outcome: ConnectorOutcome, claimable: int) -> None:
        """Count one request; ``claimable``: its plan tokens in the claimable range."""
        self.requests += 1
        self.tokens += outcome.num_tokens
        self.plan_tokens += outcome.plan_reused
        self.prefix_hit_tokens += outcome.prefix_hit.tokens
        self.reused_tokens += outcome.reused_tokens
        self.prefix_beyond_plan += outcome.prefix_hit.tokens - outcome.plan_below_hit
        self.approximate_prefix_hits += outcome.prefix_hit.depth > 0
        above_hit = outcome.plan_reused - outcome.plan_below_hit
        claim = outcome.claim
        if claim.num_claimed:
            self.claimed += 1
            self.served_from_approximate += (outcome.source_depth or 0) > 0
            self.lost_to_tail += above_hit - claim.planned_reuse
            self.lost_to_missing_chunks += claim.planned_reuse - outcome.loaded
            self.lost_to_rho += outcome.loaded - outcome.reused
        elif claimable:
            self.lost_to_thresholds += above_hit
        else:
            self.lost_to_tail += above_hit

    def as_dict(self) -> dict:
        total = max(1, self.tokens)
        return {
            "claimed_fraction": self.claimed / max(1, self.requests),
            "claimed_requests": self.claimed,
            "requests_served_from_depth_ge1": self.served_from_approximate,
            "requests_with_approximate_prefix_hit": self.approximate_prefix_hits,
            "stored_by_depth": {str(d): n for d, n in sorted(self.stored_by_depth.items())},
            "not_stored_too_deep": self.not_stored_too_deep,
            "entries_dropped_missing_chunks": self.entries_dropped,
            "token_fractions": {
                "plan": self.plan_tokens / total,
                "lost_to_thresholds": self.lost_to_thresholds / total,
                "lost_to_tail": self.lost_to_tail / total,
                "lost_to_missing_chunks": self.lost_to_missing_chunks / total,
                "lost_to_rho": self.lost_to_rho / total,
                "prefix_hit_beyond_plan": self.prefix_beyond_plan / total,
                "prefix_hit": self.prefix_hit_tokens / total,
                "reused": self.reused_tokens / total,
            },
        }


class ConnectorPolicy:
    """kvshare as the vLLM connector runs it, replayed without KV.

    Per request, in the connector's order:

    1. vLLM's prefix cache (:class:`~kvshare.bench.cache_models.BlockPool`, prefix caching
       on as in the embedded default unless ``strict_prefix_cache``) serves its hit.
    2. The connector looks the prompt up (the ``kvshare`` row's lookup, over the entries
       this replay stored) and claims with :func:`kvshare.matching.claim.decide_claim`.
    3. The claim's runs read their source chunks from the tiers (:class:`~kvshare.bench.
       cache_models.ChunkTiers`); tokens of evicted chunks are recomputed and their
       entries deleted. DHD recomputes ``rho`` of the tokens loaded.
    4. The prompt is stored with its approximation depth (see :func:`kv_origin`) if that
       is at most ``max_approx_depth`` (None: any), it has ``min_store_tokens``, and its
       scope holds no identical prompt at least as exact. Chunks are content addressed
       (:func:`kvshare.storage.keys.chunk_keys`): exact chunks are shared between entries,
       approximate ones belong to their entry. The matcher's index must hold at most
       ``index_max_entries`` (it evicts the least recently used; a claim refreshes its
       sources).
    5. vLLM caches the prompt's blocks, kvshare-filled ones included.

    Reused tokens are vLLM's hit plus the claimed tokens loaded and not recomputed. One
    public tenant; prompts are the user text without the chat template.
    """

    def __init__(self, name: str, matcher: Matcher, config: KVShareConfig, *,
                 max_approx_depth: int | None, kv_cache_tokens: int, bytes_per_token: int,
                 tier_bytes: Sequence[int], block_tokens: int = VLLM_CPU_BLOCK_TOKENS) -> None:
        if max_approx_depth is not None and max_approx_depth < 0:
            raise ValueError(f"max_approx_depth must be >= 0 or None (any), got {max_approx_depth}")
        if bytes_per_token < 1:
            raise ValueError(f"bytes_per_token must be >= 1, got {bytes_per_token}")
        if matcher.index.max_entries != config.index_max_entries:
            raise ValueError(f"{name}: the matcher's index holds up to "
                             f"{matcher.index.max_entries} entries; the connector's holds "
                             f"index_max_entries={config.index_max_entries}")
        self.name = name
        self.matcher = matcher
        self.config = config
        self.max_approx_depth = max_approx_depth
        self.bytes_per_token = bytes_per_token
        self.prefix_cache = (None if config.strict_prefix_cache
                             else BlockPool(block_tokens, max(1, kv_cache_tokens // block_tokens)))
        self.tiers = ChunkTiers(tier_bytes)
        self.stats = ConnectorStats()
        self.last: ConnectorOutcome | None = None
        self.last_lookup: LookupResult | None = None

    def reuse(self, request: Request) -> int:
        tokens = request.token_ids
        n = len(tokens)
        hit = (self.prefix_cache.lookup(tokens) if self.prefix_cache is not None
               else PrefixHit(0, 0, 0))
        lookup = self.last_lookup = self.matcher.lookup(request.text, tokens)
        plan = lookup.plan
        sources = lookup.entries
        claim = decide_claim(plan, hit.tokens, self.config, sources)
        loaded = reused = 0
        source_depth = None
        # Where reused rows may lie: before the claim's end and before the recomputed tail.
        reuse_end = min(claim_end(n, self.config), tail_start(n, self.config))
        if claim.num_claimed:
            runs = claimed_runs(plan, claim)
            loaded = self._load(runs, sources, claim.start, reuse_end)
            reused = replace(claim, planned_reuse=loaded,
                             verbatim=min(claim.verbatim, loaded)).expected_reused(self.config.rho)
            self.matcher.index.record_hits(plan.source_entries)
            source_depth = max(read_depth(run, sources[run.entry_id]) for run in runs)
        approximate_hit = hit.exact_tokens < hit.tokens
        exact_tokens, depth = kv_origin(claim, plan, sources,
                                        hit.exact_tokens if approximate_hit else n, hit.depth)
        self.last = ConnectorOutcome(
            num_tokens=n, prefix_hit=hit, plan_reused=plan.reused_tokens,
            plan_below_hit=_plan_tokens_in(plan, 0, hit.tokens), claim=claim, loaded=loaded,
            reused=reused, source_depth=source_depth, exact_tokens=exact_tokens, depth=depth,
            stored=False)
        claimable = _plan_tokens_in(plan, hit.tokens, reuse_end)
        self.stats.add(self.last, claimable)
        return self.last.reused_tokens

    def remember(self, request: Request) -> None:
        outcome, lookup = self.last, self.last_lookup
        if outcome is None or lookup is None:
            raise RuntimeError(f"{self.name}: remember() needs reuse() of the same request first")
        tokens = request.token_ids
        if self._should_store(tokens, outcome, lookup):
            self.last = replace(outcome, stored=self._store(request, outcome, lookup))
        if self.prefix_cache is not None:
            self.prefix_cache.run(tokens, outcome.prefix_hit, outcome.exact_tokens,
                                  outcome.depth)

    def _load(self, runs: list[ReuseRun], sources: dict[str, IndexEntry], start: int,
              reuse_end: int) -> int:
        """Read the runs' source chunks; returns the tokens in ``[start, reuse_end)`` whose
        chunks were found. Entries with an evicted chunk are deleted, as the connector
        deletes them."""
        size = self.config.chunk_tokens
        found: dict[str, bool] = {}
        missing: set[str] = set()
        loaded = 0
        for run in runs:
            entry = sources[run.entry_id]
            src_end = run.src_start + run.length
            for chunk in range(run.src_start // size, (src_end - 1) // size + 1):
                key = entry.chunk_keys[chunk]
                if key not in found:
                    found[key] = self.tiers.get(key)
                lo = max(run.src_start, chunk * size) - run.src_start + run.dst_start
                hi = min(src_end, (chunk + 1) * size) - run.src_start + run.dst_start
                if found[key]:
                    loaded += max(0, min(hi, reuse_end) - max(lo, start))
                else:
                    missing.add(run.entry_id)
        self.stats.entries_dropped += self.matcher.index.delete(missing)
        return loaded

    def _should_store(self, tokens: np.ndarray, outcome: ConnectorOutcome,
                      lookup: LookupResult) -> bool:
        if len(tokens) < self.config.min_store_tokens:
            return False
        if self.max_approx_depth is not None and outcome.depth > self.max_approx_depth:
            self.stats.not_stored_too_deep += 1
            return False
        return not any(hit.entry.depth <= outcome.depth and hit.entry.num_tokens == len(tokens)
                       and np.array_equal(hit.entry.token_ids, tokens) for hit in lookup.hits)

    def _store(self, request: Request, outcome: ConnectorOutcome, lookup: LookupResult) -> bool:
        """Write the prompt's chunks to the tiers and index it; False if a chunk did not fit."""
        tokens = request.token_ids
        entry_id = new_entry_id()
        keys = chunk_keys(self.matcher.model_id, tokens, self.config.chunk_tokens,
                          scope=PUBLIC_SCOPE, exact_tokens=outcome.exact_tokens,
                          variant=entry_id)
        spans = chunk_spans(len(tokens), self.config.chunk_tokens)
        hex_keys = [key.hex() for key in keys]
        held = [self.tiers.put(key, (end - start) * self.bytes_per_token)
                for key, (start, end) in zip(hex_keys, spans)]
        if not all(held):
            return False
        self.matcher.insert(request.text, tokens, embedding=lookup.embedding,
                            chunk_keys=hex_keys, entry_id=entry_id, depth=outcome.depth,
                            exact_tokens=outcome.exact_tokens)
        self.stats.stored_by_depth[outcome.depth] += 1
        return True


def _plan_tokens_in(plan: ReusePlan, lo: int, hi: int) -> int:
    """Plan tokens at positions ``[lo, hi)``."""
    return sum(max(0, min(run.dst_end, hi) - max(run.dst_start, lo)) for run in plan.runs)
