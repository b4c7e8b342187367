"""Decode correction on the real engine (in-process, prefix caching on, a small KV cache).

The engine's config leaves ``decode_correction`` at its default; requests turn it on with
their ``kvshare_decode_correction`` extra arg, so these tests share the session's engine.
Spies wrap the worker's corrector to read the paged KV around a correction; nothing is
mocked.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from engines import STUCK_S, step_until_done

from kvshare.connector.decode_correction import CORRECTION_ARG
from kvshare.recompute.engine import PromptKV, SelectiveRecomputeEngine

pytestmark = pytest.mark.engine

ON = {CORRECTION_ARG: 1}


def report(out) -> dict:
    assert out.kv_transfer_params is not None, "no kvshare load report for this request"
    return out.kv_transfer_params["kvshare"]


def edit_of(base: list[int], at: int, tokens: list[int]) -> list[int]:
    return base[:at] + tokens + base[at + len(tokens):]


def sampling(max_tokens: int, correct: bool = True):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=ON if correct else None)


@pytest.fixture(scope="module")
def stored(engine, report_tokens) -> tuple[str, list[int]]:
    """Tenant and prompt of a stored 800-token base that edits reuse."""
    tenant, base = "correct", report_tokens[100:900]
    engine.run(base, tenant)
    engine.settle()
    return tenant, base


def step_until(llm_engine, done) -> None:
    """Step the engine until ``done()``; a stuck engine fails the test."""
    deadline = time.monotonic() + STUCK_S
    while not done():
        assert time.monotonic() < deadline, f"not done after {STUCK_S:.0f} s of steps"
        llm_engine.step()


def read_rows(paged, block_ids, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[layers, num_tokens, heads, dim]`` of a request's blocks."""
    slots = paged.slots(block_ids, 0, num_tokens)
    rows = [paged.read(layer, slots) for layer in range(len(paged.layers))]
    return (torch.stack([k for k, _ in rows]), torch.stack([v for _, v in rows]))


def test_only_reused_requests_are_corrected_within_their_share(engine, stored, report_tokens):
    tenant, base = stored
    config = engine.worker.corrector.config
    fresh = engine.run(edit_of(base, 300, report_tokens[1:4]), "correct-fresh", max_tokens=4,
                       extra_args=ON)
    assert fresh.kv_transfer_params is None, "nothing to reuse, nothing to correct"
    off = engine.run(edit_of(base, 310, report_tokens[5:8]), tenant, max_tokens=4)
    assert report(off)["reused"] > 0 and "corrected" not in report(off)
    on = engine.run(edit_of(base, 320, report_tokens[9:12]), tenant, max_tokens=4,
                    extra_args=ON)
    loaded, corrected = report(on)["loaded"], report(on)["corrected"]
    assert 0 < corrected <= max(1, round(config.decode_correction_share * loaded))
    assert corrected <= report(on)["reused"]


def test_the_step_budget_bounds_every_step(engine, stored, report_tokens, monkeypatch):
    tenant, base = stored
    corrector = engine.worker.corrector
    monkeypatch.setattr(corrector, "config", dataclasses.replace(
        corrector.config, decode_correction_max_tokens_per_step=5))
    per_step: list[int] = []
    run = corrector.run

    def counted(specs):
        reports = run(specs)
        per_step.append(sum(r.corrected for r in reports))
        return reports

    monkeypatch.setattr(corrector, "run", counted)
    outs = engine.run_many([edit_of(base, at, report_tokens[at:at + 3]) for at in (330, 340)],
                           tenant, max_tokens=6, extra_args=ON)
    assert [report(out)["corrected"] for out in outs] == [5, 5]
    assert max(per_step) == 5, "a step recomputed more than its budget"


def test_corrected_rows_equal_a_fresh_recompute(engine, stored, report_tokens, monkeypatch):
    """The rows written are those the recompute engine computes for the picked tokens
    over the KV as it stood (here with the transformers model, vLLM's dtype); every
    other row stays bit for bit."""
    from kvshare.connector.shadow import reference_adapter

    tenant, base = stored
    corrector = engine.worker.corrector
    paged, seen = corrector.paged, []
    recompute = corrector.recompute

    def watched(block_ids, record, picks):
        before = read_rows(paged, block_ids, len(record.token_ids))
        recompute(block_ids, record, picks)
        seen.append((record, picks.clone(), before,
                     read_rows(paged, block_ids, len(record.token_ids))))

    monkeypatch.setattr(corrector, "recompute", watched)
    out = engine.run(edit_of(base, 350, report_tokens[20:23]), tenant, max_tokens=4,
                     extra_args=ON)
    (record, picks, before, after), = seen
    assert report(out)["corrected"] == picks.numel() > 0
    assert set(picks.tolist()) <= set(record.candidates.tolist())
    others = torch.ones(len(record.token_ids), dtype=torch.bool)
    others[picks] = False
    for old, new in zip(before, after):
        assert torch.equal(old[:, others], new[:, others]), "a row that was not picked changed"

    adapter = reference_adapter(engine.worker.model_dir, corrector.adapter.dtype)
    fresh = PromptKV(before[0].clone(), before[1].clone())
    SelectiveRecomputeEngine(adapter, rho=(), check_layers=()).prefill(
        record.token_ids, fresh, picks, exact_prefix=record.start, logits=False)

    def relative(rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Per layer: ||rows - fresh|| / ||fresh|| over the picked tokens' K and V."""
        error = sum(((r[:, picks] - f[:, picks]).float().flatten(1).norm(dim=1)) ** 2
                    for r, f in zip(rows, (fresh.keys, fresh.values)))
        scale = sum(f[:, picks].float().flatten(1).norm(dim=1) ** 2
                    for f in (fresh.keys, fresh.values))
        return (error / scale).sqrt()

    written, stale = relative(after), relative(before)
    assert written.max() < 0.03, f"corrected rows are {written.max():.3f} off a fresh recompute"
    assert stale[2:].mean() > 1.5 * written[2:].mean(), "the correction did not move the rows"


def test_blocks_shared_through_the_prefix_cache_are_never_changed(engine, stored,
                                                                  report_tokens, monkeypatch):
    """A second request holds the first four blocks of a corrected request (vLLM's prefix
    cache, ref count 2): the correction changes rows only in blocks held by one request."""
    tenant, base = stored
    planner, corrector = engine.scheduler.corrections, engine.worker.corrector
    monkeypatch.setattr(planner, "config", dataclasses.replace(planner.config,
                                                               decode_correction_step=6))
    caches, runs = corrector.paged.caches, []
    run = corrector.run

    def watched(specs):
        before = [cache.clone() for cache in caches]
        reports = run(specs)
        changed = set()
        for old, new in zip(before, caches):
            changed |= set((old != new).flatten(1).any(1).nonzero().flatten().tolist())
        runs.append((specs, reports, changed))
        return reports

    monkeypatch.setattr(corrector, "run", watched)
    llm_engine, requests = engine.llm.llm_engine, engine.engine_core.scheduler.requests
    first = edit_of(base, 300, report_tokens[30:33])
    first_id = llm_engine.add_request("shared-first", {"prompt_token_ids": first,
                                                       "cache_salt": tenant}, sampling(12))
    step_until(llm_engine, lambda: first_id in requests and requests[first_id].num_computed_tokens)
    llm_engine.add_request("shared-second", {
        "prompt_token_ids": first[:4 * 128] + report_tokens[:40], "cache_salt": tenant},
        sampling(12, correct=False))
    finished = step_until_done(llm_engine)
    (specs, reports, changed), = [r for r in runs if r[0]]
    spec, = specs
    shared = set(spec.block_ids) - set(spec.writable_blocks)
    assert shared & set(spec.block_ids[2:4]), "the second request shared no reused block"
    assert reports[0].corrected > 0 and changed
    assert changed <= set(spec.writable_blocks)
    assert report(finished["shared-first"])["corrected"] == reports[0].corrected
    assert finished["shared-second"].outputs[0].token_ids


def test_no_correction_state_outlives_its_request(engine, stored, report_tokens):
    """Finish and abort drop both halves' state (preemption: tests/faults)."""
    tenant, base = stored
    llm_engine, planner = engine.llm.llm_engine, engine.scheduler.corrections
    req_id = llm_engine.add_request("abort-armed", {"prompt_token_ids": edit_of(
        base, 360, report_tokens[40:43]), "cache_salt": tenant}, sampling(8))
    step_until(llm_engine, lambda: req_id in planner._armed)
    assert req_id in engine.worker.corrector.records
    llm_engine.abort_request([req_id], internal=True)
    finished = step_until_done(llm_engine)
    aborted = finished.get("abort-armed")  # aborted: no output, or one that says so
    assert aborted is None or aborted.outputs[0].finish_reason == "abort"
    engine.settle()
    assert not planner.holds()
    assert engine.worker.corrector.records == {} and engine.worker.corrector._trackers == {}
