"""Session-wide real parts shared by the suite (each is expensive to build)."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in Triton's interpreter where there is no GPU. The flag must be set
# before anything imports triton (vLLM does): triton.language's own helpers (tl.sum...)
# are compiled or interpreted depending on it at that moment. vLLM CPU does not use
# Triton, so its engines are not affected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer from the packaged GGUF (materialised once per machine)."""
    from kvshare.model_assets import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def wordllama(tmp_path_factory):
    from kvshare.matching.embedder import WordLlamaEmbedder

    return WordLlamaEmbedder(cache_dir=tmp_path_factory.mktemp("wordllama"))
