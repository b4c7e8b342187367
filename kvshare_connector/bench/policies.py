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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import xxhash

from kvshare.matching.align import equal_runs
from kvshare.matching.matcher import LookupResult, Matcher


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
    """vLLM-style: chained block hashes; a hit is the longest run of cached leading blocks."""

    name = "prefix"

    def __init__(self, block_tokens: int = 16) -> None:
        self.block_tokens = block_tokens
        self._blocks: set[bytes] = set()

    def _chain(self, token_ids: np.ndarray):
        parent = b""
        for start in range(0, len(token_ids) - self.block_tokens + 1, self.block_tokens):
            block = token_ids[start : start + self.block_tokens].tobytes()
            parent = xxhash.xxh3_128_digest(parent + block)
            yield parent

    def reuse(self, request: Request) -> int:
        hit = 0
        for block_hash in self._chain(request.token_ids):
            if block_hash not in self._blocks:
                break
            hit += self.block_tokens
        # vLLM caps a full hit so that the last token is recomputed, block-aligned.
        cap = _max_claim(len(request.token_ids)) // self.block_tokens * self.block_tokens
        return min(hit, cap)

    def remember(self, request: Request) -> None:
        self._blocks.update(self._chain(request.token_ids))


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
    """kvshare's own lookup (embed + index search + multi-source alignment)."""

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
