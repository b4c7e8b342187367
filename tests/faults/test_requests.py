"""Request faults during a load: an abort while the fill is in flight, and a preemption
as soon as the filled request runs.

vLLM applies aborts between steps (its EngineCore reads them from its input queue) and
preempts only running requests, when it schedules. The engine is stepped by hand to place
each fault: the abort lands in the step right after the worker received the fill (with
``fill_mode: async`` the fill is then still in flight, its request waiting for it; with
``sync`` it ran inside that step), the preemption in the first step where the filled
request runs. Preemption uses vLLM's own ``_preempt_request``, as when it runs out of
blocks.
"""

from __future__ import annotations

import time

import pytest
from engines import step_until_done
from fault_checks import edit_of, full_compute, report, stored_base

pytestmark = pytest.mark.engine


def sampling(max_tokens: int, rho: float = 1.0):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args={"kvshare_rho": rho})


@pytest.fixture
def filled(fault_engine, monkeypatch):
    """Ids of the requests whose fill the worker has received, in order. Requests a
    failed test left in the engine are aborted afterwards."""
    worker, ids = fault_engine.worker, []
    start_load_kv = worker.start_load_kv

    def recording(meta):
        ids.extend(spec.req_id for spec in meta.loads)
        return start_load_kv(meta)

    monkeypatch.setattr(worker, "start_load_kv", recording)
    yield ids
    llm_engine = fault_engine.llm.llm_engine
    left = list(fault_engine.engine_core.scheduler.requests)
    if left:
        llm_engine.abort_request(left, internal=True)
        step_until_done(llm_engine)


def step_until(llm_engine, done, what: str) -> None:
    while not done():
        assert llm_engine.has_unfinished_requests(), f"finished before {what}"
        llm_engine.step()


def assert_no_request_state(engine) -> None:
    engine.settle()
    scheduler = engine.scheduler
    assert scheduler._requests == {} and scheduler._late_reports == {}
    assert scheduler._saving == {} and engine.worker.saves.queued_bytes == 0


def test_preemption_during_a_load(fault_engine, text_tokens, filled):
    engine, tenant = fault_engine, "preempt-load"
    base = stored_base(engine, text_tokens, tenant, 140)
    prompt = edit_of(base, 50, text_tokens[1100:1103])
    expected = full_compute(engine, prompt, max_tokens=16)
    llm_engine, scheduler = engine.llm.llm_engine, engine.engine_core.scheduler
    req_id = llm_engine.add_request("preempt-load", {"prompt_token_ids": prompt,
                                                     "cache_salt": tenant}, sampling(16))
    step_until(llm_engine, lambda: req_id in filled and scheduler.requests[req_id]
               in scheduler.running, "the filled request ran")
    request = scheduler.requests[req_id]
    scheduler.running.remove(request)
    scheduler._preempt_request(request, time.monotonic())  # as vLLM does when out of blocks
    out = step_until_done(llm_engine)["preempt-load"]
    assert request.num_preemptions == 1
    assert list(out.outputs[0].token_ids) == expected
    assert report(out)["claimed"] > 0
    assert_no_request_state(engine)
    again = engine.run(edit_of(base, 70, text_tokens[1110:1113]), tenant, rho=1.0)
    assert report(again)["loaded"] > 0, "the stored base was lost"


def test_abort_during_a_load(fault_engine, text_tokens, filled):
    engine, tenant = fault_engine, "abort-load"
    base = stored_base(engine, text_tokens, tenant, 160)
    aborted, kept = (edit_of(base, at, text_tokens[1120 + at:1123 + at]) for at in (50, 90))
    expected = full_compute(engine, kept)
    llm_engine = engine.llm.llm_engine
    ids = [llm_engine.add_request(name, {"prompt_token_ids": prompt, "cache_salt": tenant},
                                  sampling(8))
           for name, prompt in (("abort-load", aborted), ("kept", kept))]
    step_until(llm_engine, lambda: ids[0] in filled, "its fill was sent")
    llm_engine.abort_request(["abort-load"])  # the client's id, as a server aborts it
    finished = step_until_done(llm_engine)
    assert list(finished["kept"].outputs[0].token_ids) == expected
    assert report(finished["kept"])["claimed"] > 0
    assert "abort-load" not in finished or finished["abort-load"].outputs[0].finish_reason \
        == "abort"
    assert_no_request_state(engine)
    assert ids[0] not in engine.engine_core.scheduler.requests
    again = engine.run(edit_of(base, 110, text_tokens[1130:1133]), tenant, rho=1.0)
    assert report(again)["loaded"] > 0, "the stored base was lost"
