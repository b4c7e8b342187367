"""Pure parts of ``kvshare bench ttft``: reuse accounting, summary and table (no engine)."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from kvshare.bench import ttft as T
from kvshare.bench.vllm_runner import Result


def test_timing_counts_reused_and_found_from_the_load_report():
    # 1000 tokens: prefix hit 256, claimed 679 of which 650 loaded and 130 recomputed.
    report = {"claimed": 679, "loaded": 650, "recomputed": 130, "reused": 549,
              "fallback": False, "seconds": 0.8, "load_seconds": 0.2, "sources": 2}
    t = T.timing("r0", 1000, Result("r0", ttft_s=3.0, num_cached_tokens=256),
                 Result("r0", ttft_s=1.0, num_cached_tokens=935, kvshare=report))
    assert t.reused == pytest.approx(0.805) and t.found == pytest.approx(0.906)
    assert t.claimed and not t.fallback and t.vanilla_prefix_hit == 256
    assert (t.fill_s, t.load_s, t.recomputed, t.sources) == (0.8, 0.2, 130, 2)
    miss = T.timing("r1", 1000, Result("r1", ttft_s=3.0), Result("r1", ttft_s=3.1,
                                                                 num_cached_tokens=128))
    assert not miss.claimed and miss.reused == pytest.approx(0.128)


def timings():
    return [
        T.Timing("a", 1000, 3.0, 0.5, 0.80, 0.95, True),          # hit, 6x
        T.Timing("b", 1000, 3.0, 1.0, 0.75, 0.90, True),          # hit, 3x
        T.Timing("c", 1000, 3.0, 2.0, 0.50, 0.60, True, True),    # partial, fell back
        T.Timing("d", 1000, 2.0, 2.1, 0.0, 0.0, False),           # miss, 1.05x slower
        T.Timing("e", 1000, 2.0, 2.0, 0.3, 0.3, False),           # miss (prefix hit), 1.0x
    ]


def test_summary_splits_hits_partial_and_misses_and_covers_all():
    s = T.summarize(timings(), 0.85)
    assert (s["n_hits"], s["n_misses"], s["n_partial"]) == (2, 2, 1)
    assert s["speedup_median_hits"] == pytest.approx(4.5)
    assert s["slowdown_median_misses"] == pytest.approx(1.025)
    assert s["speedup_median_partial"] == pytest.approx(1.5)
    assert s["speedup_median_all"] == pytest.approx(1.5)       # 6, 3, 1.5, 0.95, 1.0
    assert s["reused_median"] == pytest.approx(0.5)
    assert s["reused_median_hits"] == pytest.approx(0.775)
    assert s["kvshare_ttft_median_s"] == pytest.approx(2.0)
    assert s["fallbacks"] == {"vanilla": 0, "kvshare": 1}
    data = json.loads(json.dumps(s))
    assert {"speedup_median_hits", "slowdown_median_misses", "n_hits", "n_misses",
            "speedup_median_all", "reused_median", "fallbacks"} <= set(data)
    table = T.markdown_table(s)
    assert "| all | 5 | 50% | 3000 ms | 2000 ms | 1.50x faster |" in table
    assert "| hits (found >= 85%) | 2 | 78% | 3000 ms | 750 ms | 4.50x faster |" in table
    assert re.search(r"\| misses \(nothing claimed\) \| 2 \| \| \| \| 1\.0[23]x slower \|", table)
    assert "**fallbacks**: 1 of 5 kvshare requests fell back to full recompute" in table


def test_summary_of_nothing_is_null_not_an_error():
    s = T.summarize([], 0.85)
    assert s["speedup_median_hits"] is None and s["n_hits"] == 0
    table = T.markdown_table(s)
    assert "| hits (found >= 85%) | 0 | - | - | - | - faster |" in table
    assert "fallbacks: none" in table


def test_cli_rejects_bad_values():
    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    for argv, message in ([["--requests", "-1"], "--requests must be >= 0, got -1"],
                          [["--hit-found", "0"], "--hit-found must be in (0, 1], got 0.0"],
                          [["--min-tokens", "10", "--max-tokens", "5"],
                           "need 1 <= --min-tokens <= --max-tokens, got 10 and 5"],
                          [["--set", "tail=1"], "unknown kvshare config key 'tail'"]):
        args = parser.parse_args(argv)
        args.config = None
        with pytest.raises(SystemExit, match=re.escape(message)):
            T.run(args)
    assert parser.parse_args(["--compiled"]).compiled and not parser.parse_args([]).compiled
