"""Session-wide real parts shared by the suite (each is expensive to build)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer from the packaged GGUF (materialised once per machine)."""
    from kvshare.model_assets import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def wordllama(tmp_path_factory):
    from kvshare.matching.embedder import WordLlamaEmbedder

    return WordLlamaEmbedder(cache_dir=tmp_path_factory.mktemp("wordllama"))
