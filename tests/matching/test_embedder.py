"""The default embedder loads offline and is deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from kvshare.matching.embedder import WordLlamaEmbedder, make_embedder


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> WordLlamaEmbedder:
    return WordLlamaEmbedder(max_chars=64, cache_dir=tmp_path_factory.mktemp("wordllama"))


def test_same_text_same_vector_across_batches_and_instances(embedder, tmp_path):
    texts = ["analyse Jon Snow", "analyse Lin Daiyu", "what is the capital of France?"]
    batch = embedder.embed(texts)
    assert batch.shape == (3, embedder.dim) and batch.dtype == np.float32
    one_by_one = np.concatenate([embedder.embed([t]) for t in texts])
    np.testing.assert_array_equal(batch, one_by_one)
    fresh = WordLlamaEmbedder(max_chars=64, cache_dir=tmp_path)
    np.testing.assert_array_equal(fresh.embed(texts), batch)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, rtol=1e-5)


def test_similar_texts_are_closer_than_unrelated_ones(embedder):
    a, b, c = embedder.embed([
        "Write a cover letter for a software engineer job at Google",
        "Write a cover letter for a software engineer job at Amazon",
        "How do I bake sourdough bread at home?",
    ])
    assert a @ b > a @ c


def test_only_a_bounded_prefix_is_embedded(embedder):
    base = "x" * 64
    np.testing.assert_array_equal(embedder.embed([base + " tail one"]),
                                  embedder.embed([base + " something else"]))


def test_empty_batch_and_unknown_spec():
    assert make_embedder("wordllama").embed([]).shape == (0, 256)
    with pytest.raises(ValueError, match="'no-such-model'"):
        make_embedder("no-such-model")
