"""Pure parts of ``kvshare bench ttft``: reuse accounting, summary and table (no engine)."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from kvshare.bench import ttft as T


def test_reuse_fraction_counts_prefix_hit_and_loaded_tokens():
    # 1000 tokens: prefix hit 256, claimed 743 of which 700 loaded, vLLM computes 1.
    report = {"claimed": 743, "loaded": 700, "recomputed": 120}
    assert T.reuse_fraction(1000, 999, report) == pytest.approx(0.956)
    assert T.reuse_fraction(1000, 256, None) == pytest.approx(0.256)
    with pytest.raises(ValueError, match="prompt_tokens must be > 0, got 0"):
        T.reuse_fraction(0, 0, None)


def test_summary_splits_hits_partial_and_misses():
    timings = [
        T.Timing("a", 1000, 3.0, 0.5, 0.95, True),   # hit, 6x
        T.Timing("b", 1000, 3.0, 1.0, 0.90, True),   # hit, 3x
        T.Timing("c", 1000, 3.0, 2.0, 0.60, True),   # partial
        T.Timing("d", 1000, 2.0, 2.1, 0.0, False),   # miss, 1.05x slower
        T.Timing("e", 1000, 2.0, 2.0, 0.3, False),   # miss (prefix hit only), 1.0x
    ]
    s = T.summarize(timings, 0.85)
    assert (s["n_hits"], s["n_misses"], s["n_partial"]) == (2, 2, 1)
    assert s["speedup_median_hits"] == pytest.approx(4.5)
    assert s["slowdown_median_misses"] == pytest.approx(1.025)
    assert s["speedup_median_partial"] == pytest.approx(1.5)
    data = json.loads(json.dumps(s))
    assert {"speedup_median_hits", "slowdown_median_misses", "n_hits", "n_misses"} <= set(data)
    table = T.markdown_table(s)
    assert "| hits (reuse >= 85%) | 2 | 3000 ms | 750 ms | 4.50x faster |" in table
    assert "| misses (nothing claimed) | 2 | | | 1.02x slower |" in table or \
        "| misses (nothing claimed) | 2 | | | 1.03x slower |" in table


def test_summary_of_nothing_is_null_not_an_error():
    s = T.summarize([], 0.85)
    assert s["speedup_median_hits"] is None and s["n_hits"] == 0
    assert "| hits (reuse >= 85%) | 0 | - | - | - faster |" in T.markdown_table(s)


def test_cli_rejects_bad_values():
    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    for argv, message in ([["--requests", "-1"], "--requests must be >= 0, got -1"],
                          [["--hit-reuse", "0"], "--hit-reuse must be in (0, 1], got 0.0"],
                          [["--min-tokens", "10", "--max-tokens", "5"],
                           "need 1 <= --min-tokens <= --max-tokens, got 10 and 5"]):
        args = parser.parse_args(argv)
        args.config = None
        with pytest.raises(SystemExit, match=re.escape(message)):
            T.run(args)
