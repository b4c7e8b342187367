"""Prompt embedders for retrieval: WordLlama by default, sentence-transformers optionally.

Embeddings only choose which earlier prompts to *align* against; the token alignment
decides what is reused. So a cheap static-word-embedding model is the right default: it
embeds 15.6k ShareGPT prompts in about 20 s on two cores and ships inside its wheel.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from kvshare.config import default_home


class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors; equal texts give equal vectors."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, unit norm (zero vector for empty text)."""
        ...


def make_embedder(spec: str, max_chars: int = 4096, cache_dir: Path | None = None) -> Embedder:
    """``"wordllama"`` or a sentence-transformers model directory."""
    if spec == "wordllama":
        return WordLlamaEmbedder(max_chars=max_chars, cache_dir=cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        return SentenceTransformerEmbedder(path, max_chars=max_chars)
    raise ValueError(
        f"embedder {spec!r} is neither 'wordllama' nor an existing sentence-transformers directory"
    )


class WordLlamaEmbedder:
    """WordLlama ``l2_supercat`` (256 dims), loaded strictly offline.

    wordllama 0.4 looks for its shipped tokenizer under ``wordllama/tokenizer/`` while the
    wheel puts it in ``wordllama/tokenizers/``, then tries to download it. We copy the
    shipped file into our own cache's ``tokenizers/`` and pass ``disable_download=True``.
    """

    name = "wordllama-l2_supercat-256"
    dim = 256
    _BATCH = 256

    def __init__(self, max_chars: int = 4096, cache_dir: Path | None = None) -> None:
        self.max_chars = max_chars
        self.cache_dir = cache_dir or default_home() / "wordllama"

    @cached_property
    def _model(self):
        from wordllama import WordLlama

        spec = importlib.util.find_spec("wordllama")
        assert spec is not None and spec.submodule_search_locations
        shipped = Path(next(iter(spec.submodule_search_locations))) / "tokenizers"
        target = self.cache_dir / "tokenizers"
        target.mkdir(parents=True, exist_ok=True)
        for config in shipped.glob("*.json"):
            if not (target / config.name).exists():
                shutil.copyfile(config, target / config.name)
        return WordLlama.load(cache_dir=self.cache_dir, disable_download=True, dim=self.dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        clipped = [text[: self.max_chars] for text in texts]
        parts = [
            np.asarray(self._model.embed(clipped[i : i + self._BATCH], norm=True), np.float32)
            for i in range(0, len(clipped), self._BATCH)
        ]
        return _unit_rows(np.concatenate(parts))


class SentenceTransformerEmbedder:
    """Any local sentence-transformers model directory (the optional quality upgrade)."""

    def __init__(self, path: Path, max_chars: int = 4096) -> None:
        self.path = path
        self.max_chars = max_chars
        self.name = f"st-{path.name}"

    @cached_property
    def _model(self):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(self.path), device="cpu", local_files_only=True)

    @cached_property
    def dim(self) -> int:  # type: ignore[override]
        return int(self._model.get_sentence_embedding_dimension())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self._model.encode(
            [text[: self.max_chars] for text in texts], batch_size=64, convert_to_numpy=True
        )
        return _unit_rows(np.asarray(vectors, np.float32))


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
