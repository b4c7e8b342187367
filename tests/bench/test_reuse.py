"""Reuse accounting from vLLM's cached-token count and the connector's load report."""

from __future__ import annotations

import pytest

from kvshare.bench.reuse import RequestReuse


def test_reused_counts_prefix_hit_and_claimed_tokens_not_recomputed():
    # 1000 tokens: vLLM prefix hit 256, claimed 679 (loaded 650, recomputed 130 of which
    # 29 for missing chunks and 101 DHD picks of loaded tokens), vLLM computes the last 65.
    report = {"claimed": 679, "loaded": 650, "recomputed": 130, "reused": 549,
              "fallback": False}
    reuse = RequestReuse.of(1000, 935, report)
    assert reuse.prefix_hit == 256
    assert reuse.reused == 256 + 549
    assert reuse.found == 256 + 650
    assert reuse.reused_fraction == pytest.approx(0.805)
    assert reuse.found_fraction == pytest.approx(0.906)
    assert reuse.computed_fraction == pytest.approx(0.195)
    assert not reuse.fallback


def test_without_a_report_only_the_prefix_hit_is_reused():
    reuse = RequestReuse.of(1000, 256, None)
    assert (reuse.claimed, reuse.reused, reuse.found) == (0, 256, 256)


def test_a_fallback_reuses_nothing_it_claimed():
    report = {"claimed": 900, "loaded": 900, "recomputed": 900, "reused": 0, "fallback": True}
    reuse = RequestReuse.of(1000, 900, report)
    assert reuse.fallback and reuse.reused == 0 and reuse.found == 900


def test_inconsistent_counts_are_errors_naming_them():
    with pytest.raises(ValueError, match="prompt_tokens must be > 0, got 0"):
        RequestReuse.of(0, 0, None)
    with pytest.raises(ValueError, match=r"claimed \(500\) <= num_cached_tokens \(400\)"):
        RequestReuse.of(1000, 400, {"claimed": 500, "loaded": 500, "recomputed": 0})
    with pytest.raises(ValueError, match="reused != claimed - recomputed"):
        RequestReuse.of(1000, 600, {"claimed": 500, "loaded": 500, "recomputed": 10,
                                    "reused": 500})
    with pytest.raises(ValueError, match="outside"):
        RequestReuse.of(1000, 600, {"claimed": 500, "loaded": 501, "recomputed": 0})
