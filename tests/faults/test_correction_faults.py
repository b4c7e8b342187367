"""Request faults during a decode correction: preemption, abort, and a correction that
raises.

A reused request with the correction on (``kvshare_decode_correction``) is armed once its
fill's load report is in; its correction runs before vLLM's forward of its first
generated token. "During a correction" is that window: the engine is stepped by hand
until the request is armed and running, and the fault lands before the correction step.
Preemption drops the correction: a resumed request is corrected only if it is filled
again (here vLLM's prefix cache still holds its blocks, so it is not). The correction
changes only approximate KV, so full compute equality holds for the requests beside it
(fresh tenants), and for the faulted request where the correction never ran: its answer
is the one the connector gives with the correction off.
"""

from __future__ import annotations

import time

import pytest
from engines import STUCK_S, step_until_done
from fault_checks import assert_one_line_names, edit_of, full_compute, report, stored_base

from kvshare.connector.decode_correction import CORRECTION_ARG, DecodeCorrector

pytestmark = pytest.mark.engine


def sampling(max_tokens: int, correct: bool = True):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args={CORRECTION_ARG: int(correct)})


def step_until_armed(engine, req_id: str) -> None:
    """Step until the request's fill is reported and it runs, its correction due in one of
    its next steps (an asynchronous fill ends before vLLM schedules the request again)."""
    llm_engine, planner = engine.llm.llm_engine, engine.scheduler.corrections
    scheduler = engine.engine_core.scheduler
    deadline = time.monotonic() + STUCK_S
    while not (req_id in planner._armed
               and any(request.request_id == req_id for request in scheduler.running)):
        assert llm_engine.has_unfinished_requests(), f"{req_id} finished unarmed"
        assert time.monotonic() < deadline, f"{req_id} not armed after {STUCK_S:.0f} s"
        llm_engine.step()


def assert_no_state(engine) -> None:
    engine.settle()
    assert not engine.scheduler.corrections.holds()
    assert engine.worker.corrector.records == {} and engine.worker.corrector._trackers == {}
    assert engine.scheduler._requests == {} and engine.scheduler._late_reports == {}


def test_preemption_during_a_decode_correction(fault_engine, text_tokens, caplog):
    engine, tenant = fault_engine, "preempt-correction"
    base = stored_base(engine, text_tokens, tenant, 200)
    beside = edit_of(base, 40, text_tokens[1000:1003])
    expected = full_compute(engine, beside, max_tokens=12)
    llm_engine, scheduler = engine.llm.llm_engine, engine.engine_core.scheduler
    req_id = llm_engine.add_request("preempted", {"prompt_token_ids": edit_of(
        base, 60, text_tokens[1010:1013]), "cache_salt": tenant}, sampling(12))
    llm_engine.add_request("beside", {"prompt_token_ids": beside,
                                      "cache_salt": "preempt-correction-full"}, sampling(12))
    step_until_armed(engine, req_id)
    request = scheduler.requests[req_id]
    scheduler.running.remove(request)
    scheduler._preempt_request(request, time.monotonic())  # as vLLM does when out of blocks
    finished = step_until_done(llm_engine)
    assert request.num_preemptions == 1
    assert list(finished["beside"].outputs[0].token_ids) == expected
    out = finished["preempted"]
    assert len(out.outputs[0].token_ids) == 12
    # Resumed from its own blocks in vLLM's prefix cache: no refill, so nothing armed it
    # again, and it decoded over its fill's KV as it was.
    assert report(out)["claimed"] > 0 and report(out)["corrected"] == 0
    assert_one_line_names(caplog.records, "preempted before its decode correction",
                          level=20)
    assert_no_state(engine)


def test_abort_during_a_decode_correction(fault_engine, text_tokens):
    engine, tenant = fault_engine, "abort-correction"
    base = stored_base(engine, text_tokens, tenant, 240)
    kept = edit_of(base, 40, text_tokens[1020:1023])
    expected = full_compute(engine, kept)
    llm_engine = engine.llm.llm_engine
    req_id = llm_engine.add_request("aborted", {"prompt_token_ids": edit_of(
        base, 60, text_tokens[1030:1033]), "cache_salt": tenant}, sampling(8))
    llm_engine.add_request("kept", {"prompt_token_ids": kept,
                                    "cache_salt": "abort-correction-full"}, sampling(8))
    step_until_armed(engine, req_id)
    llm_engine.abort_request([req_id], internal=True)
    finished = step_until_done(llm_engine)
    assert list(finished["kept"].outputs[0].token_ids) == expected
    aborted = finished.get("aborted")  # aborted: no output, or one that says so
    assert aborted is None or aborted.outputs[0].finish_reason == "abort"
    assert_no_state(engine)
    again = engine.run(edit_of(base, 80, text_tokens[1040:1043]), tenant,
                       extra_args={CORRECTION_ARG: 1})
    assert report(again)["corrected"] > 0, "the engine stopped correcting"


def test_a_failing_correction_leaves_the_fill_and_serves(fault_engine, text_tokens, caplog,
                                                         monkeypatch):
    """The correction raises before it writes: one line, and the request's answer is the
    one it gets with the correction off (same stored base, a twin tenant)."""
    engine = fault_engine
    prompts = {}
    for tenant in ("failing-correction", "no-correction"):
        base = stored_base(engine, text_tokens, tenant, 280)
        prompts[tenant] = edit_of(base, 60, text_tokens[1050:1053])
    without = engine.run(prompts["no-correction"], "no-correction", max_tokens=12,
                         extra_args={CORRECTION_ARG: 0})

    def broken(self, spec, positions):
        raise RuntimeError("injected attention fault")

    monkeypatch.setattr(DecodeCorrector, "new_token_attention", broken)
    failed = engine.run(prompts["failing-correction"], "failing-correction", max_tokens=12,
                        extra_args={CORRECTION_ARG: 1})
    assert report(failed)["corrected"] == 0
    assert failed.outputs[0].token_ids == without.outputs[0].token_ids
    assert_one_line_names(caplog.records, "injected attention fault")
    assert_no_state(engine)
