"""Request streams built from real ShareGPT prompts, shared by every benchmark.

The "similar" stream follows the KVShare paper: take first user turns in order, drop
exact duplicates, embed, keep prompts that have a neighbour within cosine distance 0.05
anywhere in the set, and replay them in original order. The "all" stream is the same
prompts without the similarity filter. Token ids (SmolLM2 tokenizer, no special
tokens) and embeddings are cached under ``<home>/bench`` because computing them for
15.6k prompts costs about a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvshare.config import KVShareConfig
from kvshare.matching.embedder import Embedder

logger = logging.getLogger(__name__)

MIN_PROMPT_TOKENS = 16
SIMILAR_MAX_COSINE_DISTANCE = 0.05
_BLOCK_ROWS = 1024


def add_prompt_length_arguments(parser: argparse.ArgumentParser, min_tokens: int,
                                max_tokens: int) -> None:
    """``--min-tokens`` / ``--max-tokens``: the user-text lengths a command replays."""
    parser.add_argument("--min-tokens", type=int, default=min_tokens,
                        help=f"shortest prompt in user-text tokens (default: {min_tokens})")
    parser.add_argument("--max-tokens", type=int, default=max_tokens,
                        help=f"longest prompt in user-text tokens (default: {max_tokens})")


def check_prompt_lengths(args: argparse.Namespace) -> None:
    """Exit with the bad values when the ``--min-tokens`` .. ``--max-tokens`` range is empty."""
    if not 1 <= args.min_tokens <= args.max_tokens:
        raise SystemExit(f"need 1 <= --min-tokens <= --max-tokens, got {args.min_tokens} "
                         f"and {args.max_tokens}")


@dataclass
class Workload:
    """Deduplicated ShareGPT first turns of >= 16 tokens, in file order."""

    texts: list[str]
    token_ids: list[np.ndarray]
    embeddings: np.ndarray
    """[n, dim] unit-norm float32."""

    def __len__(self) -> int:
        return len(self.texts)

    def similar_positions(self, max_distance: float = SIMILAR_MAX_COSINE_DISTANCE) -> np.ndarray:
        """Positions of prompts with another prompt within ``max_distance`` (any order)."""
        keep = np.zeros(len(self), bool)
        for start, sims in _similarity_blocks(self.embeddings):
            rows = np.arange(start, start + len(sims))
            sims[np.arange(len(sims)), rows] = -np.inf  # not yourself
            keep[rows] = sims.max(axis=1) >= 1.0 - max_distance
        return np.flatnonzero(keep)


def load_workload(config: KVShareConfig, embedder: Embedder, tokenizer) -> Workload:
    """Build (or read from cache) the deduplicated ShareGPT workload."""
    from tqdm import tqdm

    from kvshare.data.sharegpt import first_user_turns

    texts = list(dict.fromkeys(first_user_turns()))
    cache = _cache_path(config.home_dir, texts, embedder, tokenizer)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            offsets, flat, keep = data["offsets"], data["tokens"], data["keep"]
            embeddings = data["embeddings"]
    else:
        token_lists = []
        for i in tqdm(range(0, len(texts), 512), desc="tokenize", unit="batch"):
            batch = tokenizer(texts[i : i + 512], add_special_tokens=False)["input_ids"]
            token_lists.extend(batch)
        keep = np.array([len(ids) >= MIN_PROMPT_TOKENS for ids in token_lists])
        kept_texts = [t for t, k in zip(texts, keep) if k]
        embeddings = np.concatenate([
            embedder.embed(kept_texts[i : i + 1024])
            for i in tqdm(range(0, len(kept_texts), 1024), desc="embed", unit="batch")
        ])
        lengths = [len(ids) for ids, k in zip(token_lists, keep) if k]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate([np.asarray(ids, np.int32) for ids, k in zip(token_lists, keep) if k])
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, offsets=offsets, tokens=flat, keep=keep, embeddings=embeddings)
        tmp.rename(cache)
    kept_texts = [t for t, k in zip(texts, keep) if k]
    token_ids = [flat[offsets[i] : offsets[i + 1]] for i in range(len(kept_texts))]
    return Workload(kept_texts, token_ids, np.asarray(embeddings, np.float32))


def nearest_earlier(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row i, the k most similar rows j < i: (indices [n, k], sims [n, k]).

    Missing neighbours (fewer than k earlier rows) have index -1 and similarity -inf.
    Exact (brute force in blocks), so oracles are not limited by an ANN's recall.
    """
    n = len(embeddings)
    indices = np.full((n, k), -1, np.int64)
    sims_out = np.full((n, k), -np.inf, np.float32)
    for start, sims in _similarity_blocks(embeddings):
        rows = np.arange(start, start + len(sims))
        sims[np.arange(n)[None, :] >= rows[:, None]] = -np.inf  # only earlier prompts
        take = min(k, n)
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1)
        top, top_sims = np.take_along_axis(top, order, 1), np.take_along_axis(top_sims, order, 1)
        valid = np.isfinite(top_sims)
        indices[rows, :take] = np.where(valid, top, -1)
        sims_out[rows, :take] = top_sims
    return indices, sims_out


def _similarity_blocks(embeddings: np.ndarray):
    for start in range(0, len(embeddings), _BLOCK_ROWS):
        yield start, embeddings[start : start + _BLOCK_ROWS] @ embeddings.T


def _cache_path(home: Path, texts: list[str], embedder: Embedder, tokenizer) -> Path:
    digest = hashlib.sha256()
    digest.update(embedder.name.encode())
    digest.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    digest.update(str(len(texts)).encode())
    for text in texts[:: max(1, len(texts) // 512)]:
        digest.update(text.encode())
    return home / "bench" / f"sharegpt-{digest.hexdigest()[:16]}.npz"
