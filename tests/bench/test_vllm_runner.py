"""The runner's teacher-forcing rows and scores, read from real vLLM output objects.

No engine starts: the ``RequestOutput`` is built the way vLLM's output processor builds
it for a request with ``prompt_logprobs`` and ``flat_logprobs``.
"""

from __future__ import annotations

import math

import pytest
from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs
from vllm.outputs import CompletionOutput, RequestOutput

from kvshare.bench import vllm_runner as R

PROMPT = [11, 12, 13, 14]
FORCED = [21, 22]


def request_output(rows: list[dict[int, float]], num_cached_tokens: int = 0) -> RequestOutput:
    """A finished teacher-forced request: one row of {token: logprob} per prompt position
    after the first, the actual next token first (as vLLM orders them)."""
    logprobs = create_prompt_logprobs(flat_logprobs=True)
    for row in rows:
        append_logprobs_for_next_position(logprobs, list(row), list(row.values()),
                                          [None] * len(row), 1, len(row) - 1)
    return RequestOutput("tf/x", None, PROMPT + FORCED, logprobs,
                         [CompletionOutput(0, "", [5], None, None)], True,
                         num_cached_tokens=num_cached_tokens)


def rows_for(forced_rows: list[dict[int, float]]) -> list[dict[int, float]]:
    prompt_rows = [{token: -0.1, 99: -3.0} for token in PROMPT[1:]]
    return prompt_rows + forced_rows


FORCED_ROWS = [{21: math.log(0.6), 30: math.log(0.3)}, {22: math.log(0.9), 31: math.log(0.05)}]


def test_forced_rows_are_the_continuation_positions():
    req = R.Req("tf/x", PROMPT, 1, forced_from="later/ref/x", top_k=1)
    rows = R._forced_rows(req, request_output(rows_for(FORCED_ROWS), 3), len(PROMPT),
                          len(FORCED))
    assert rows == [pytest.approx(r) for r in FORCED_ROWS]


def test_a_cache_hit_into_the_continuation_is_refused():
    req = R.Req("tf/x", PROMPT, 1, forced_from="later/ref/x", top_k=1)
    with pytest.raises(RuntimeError, match="4 of its positions came from a cache"):
        R._forced_rows(req, request_output(rows_for(FORCED_ROWS), 4), len(PROMPT),
                       len(FORCED))
    with pytest.raises(RuntimeError, match="expected prompt log-probabilities for 7"):
        R._forced_rows(req, request_output(rows_for(FORCED_ROWS)[:-1]), len(PROMPT), 3)


def test_scores_compare_with_the_reference_rows():
    reference = R.Result("tf/ref/x", forced_ids=[list(r) for r in FORCED_ROWS],
                         forced_logprobs=[list(r.values()) for r in FORCED_ROWS])
    req = R.Req("tf/kvshare/x", PROMPT, 1, forced_from="later/ref/x", top_k=1,
                reference_from="tf/ref/x")
    same = R._scores(req, FORCED_ROWS, reference)
    assert [s["kl"] for s in same] == [0.0, 0.0] and all(s["top1"] for s in same)
    flipped = [{21: math.log(0.3), 30: math.log(0.6)}, FORCED_ROWS[1]]
    scores = R._scores(req, flipped, reference)
    assert not scores[0]["top1"] and scores[0]["kl"] > 0.1 and scores[1]["kl"] == 0.0
    with pytest.raises(ValueError, match="1 forced positions, but the reference"):
        R._scores(req, flipped[:1], reference)
    with pytest.raises(ValueError, match="has no rows"):
        R._scores(req, flipped, R.Result("later/ref/x"))


def test_references_must_exist():
    req = R.Req("tf/x", PROMPT, forced_from="later/ref/y")
    known = {"later/ref/x": R.Result("later/ref/x", output_ids=FORCED)}
    assert R._earlier({}, known, req, "later/ref/x").output_ids == FORCED
    with pytest.raises(ValueError, match="'later/ref/y', which is neither an earlier request"):
        R._earlier({}, known, req, "later/ref/y")


def test_warmup_runs_a_fill_in_a_scope_of_its_own():
    prompt = list(range(100, 1300))
    warm = R.warmup_requests(prompt)
    assert [r.req_id for r in warm] == ["warmup/0", "warmup/1", "warmup/fill/0", "warmup/fill/1"]
    first, second = warm[2], warm[3]
    assert first.salt == second.salt == "warmup/fill"
    assert second.token_ids == first.token_ids[1:]  # no prefix hit, everything to align
    assert len(first.token_ids) == 1024
    assert len({r.salt for r in warm}) == 3


def test_results_written_before_a_crash_at_shutdown_are_kept(tmp_path, caplog):
    out = tmp_path / "out.json"
    tail = ["terminate called without an active exception"]
    with pytest.raises(R.EngineUnavailable, match="engine 'vanilla' exited with -6: terminate"):
        R.results_of("vanilla", -6, out, tail)  # no results: the engine failed
    out.write_text('[{"req_id": "later/ref/x", "output_ids": [5]}]')
    (kept,) = R.results_of("vanilla", -6, out, tail)
    assert kept.req_id == "later/ref/x" and kept.output_ids == [5]
    assert "exited with -6 after writing all its results" in caplog.text
