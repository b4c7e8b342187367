"""``kvshare demo``'s report: rows grouped by reuse, medians and the summary table.

The engines themselves are exercised by ``tests/connector``; here the report must say
what happened to each request.
"""

from __future__ import annotations

import pytest

from kvshare.demo import DemoRow, fallback_line, fallbacks, print_rows, summarize, summary_table


def row(index: int, reused: float, vanilla: float, kvshare: float, same: bool,
        fallback: bool = False) -> DemoRow:
    return DemoRow(index=index, role="later" if index % 2 else "earlier", prompt_tokens=500,
                   reused=reused, recomputed=int(reused * 100), fallback=fallback,
                   vanilla_ttft_s=vanilla, kvshare_ttft_s=kvshare, same_answer=same,
                   rouge_l=1.0 if same else 0.5, preview=f"prompt {index}")


@pytest.fixture
def rows() -> list[DemoRow]:
    return [row(0, 0.0, 1.0, 1.1, True), row(1, 0.9, 1.0, 0.25, True),
            row(2, 0.0, 2.0, 2.0, True), row(3, 0.99, 2.0, 0.4, False),
            row(4, 0.6, 1.0, 0.5, True)]


def test_summary_separates_reuse_from_misses(rows):
    summary = summarize(rows)
    reused, computed = summary["reused"], summary["computed"]
    assert (reused["requests"], computed["requests"]) == (3, 2)
    assert reused["speedup_median"] == pytest.approx(4.0)  # 4x, 5x, 2x
    assert computed["speedup_median"] == pytest.approx((1 / 1.1 + 1.0) / 2)
    assert reused["same_answer"] == pytest.approx(2 / 3)
    assert reused["rouge_l_mean"] == pytest.approx(2.5 / 3)


def test_summary_of_a_stream_without_hits_has_empty_cells():
    summary = summarize([row(0, 0.0, 1.0, 1.0, True)])
    assert summary["reused"]["requests"] == 0 and summary["reused"]["speedup_median"] is None
    table = summary_table(summary)
    assert "| kvshare reused >= 50% | 0 | - | - | - | - | - | - |" in table


def test_rows_print_speedup_and_answer(rows, capsys):
    print_rows(rows)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "4.00x" in lines[3] and "same" in lines[3]
    assert "5.00x" in lines[5] and "ROUGE 0.50" in lines[5]


def test_fallbacks_are_counted_and_said_out_loud(rows, capsys):
    assert fallbacks(rows) == 0 and fallback_line(rows) == "fallbacks: none"
    rows[3] = row(3, 0.0, 2.0, 2.5, True, fallback=True)
    assert fallbacks(rows) == 1
    assert fallback_line(rows).startswith("**fallbacks**: 1 of 5 kvshare requests fell back")
    assert "#3" in fallback_line(rows)
    print_rows(rows)
    assert "FALLBACK" in capsys.readouterr().out.splitlines()[5]
