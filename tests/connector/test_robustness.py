"""The connector never crashes or stalls the engine and leaves no state behind.

On the in-process engine (prefix caching on, a small KV cache), so that tests can step
vLLM request by request, inject faults into the connector's halves and look at what they
hold afterwards. A claim ends ``TAIL + 1`` tokens before the prompt's end, so vLLM's
prefix hit plus kvshare's claim (``num_cached_tokens``) is ``len(prompt) - 1 - TAIL``
whatever part vLLM's prefix cache still held.
"""

from __future__ import annotations

import threading
import time

import pytest
from engines import TAIL, step_until_done

pytestmark = pytest.mark.engine


def report(out) -> dict:
    assert out.kv_transfer_params is not None, "no kvshare load report for this request"
    return out.kv_transfer_params["kvshare"]


def claimed_to_the_tail(out) -> bool:
    """kvshare claimed everything from vLLM's prefix hit up to the prompt's tail."""
    return (out.num_cached_tokens == len(out.prompt_token_ids) - 1 - TAIL
            and report(out)["claimed"] > 0)


@pytest.fixture(scope="module")
def stored(engine, report_tokens) -> tuple[str, list[int]]:
    """Tenant and prompt of a stored 600-token base that edits can reuse."""
    tenant, base = "robust", report_tokens[100:700]
    engine.run(base, tenant)
    engine.settle()
    return tenant, base


def edit_of(base: list[int], at: int, tokens: list[int]) -> list[int]:
    return base[:at] + tokens + base[at + len(tokens):]


def test_a_request_finishing_in_its_load_step_keeps_its_report(engine, stored,
                                                               report_tokens, tokenizer):
    tenant, base = stored
    one = engine.run(edit_of(base, 300, report_tokens[5:8]), tenant, max_tokens=1)
    assert claimed_to_the_tail(one)
    assert len(one.outputs[0].token_ids) == 1
    # EOS as the first token (the only token it may sample).
    eos = tokenizer.eos_token_id
    stopped = engine.run(edit_of(base, 320, report_tokens[9:12]), tenant, max_tokens=8,
                                ignore_eos=False, allowed_token_ids=[eos])
    assert stopped.outputs[0].finish_reason == "stop"
    assert len(stopped.outputs[0].token_ids) <= 1
    assert claimed_to_the_tail(stopped)


def test_several_claims_in_one_step(engine, stored, report_tokens):
    tenant, base = stored
    edits = [edit_of(base, at, report_tokens[at:at + 3]) for at in (150, 250, 350)]
    outs = engine.run_many(edits, tenant)
    for out in outs:
        assert claimed_to_the_tail(out)
        assert report(out)["reused"] > report(out)["claimed"] // 2
        assert not report(out)["fallback"] and len(out.outputs[0].token_ids) == 8


def test_a_failing_lookup_means_no_claim_and_the_engine_serves(engine, stored,
                                                               report_tokens, monkeypatch):
    tenant, base = stored
    prompt = edit_of(base, 200, report_tokens[20:23])

    def broken(*args, **kwargs):
        raise RuntimeError("injected lookup failure")

    monkeypatch.setattr(engine.scheduler.catalog, "lookup", broken)
    served = engine.run(prompt, tenant)
    monkeypatch.undo()
    vanilla = engine.run(prompt, tenant + "-vanilla")
    assert served.kv_transfer_params is None  # vLLM computed it (after its own prefix hit)
    assert served.outputs[0].token_ids == vanilla.outputs[0].token_ids
    assert report(engine.run(edit_of(base, 210, report_tokens[30:33]), tenant))["claimed"]


def test_a_failing_fill_is_recomputed_and_counted_as_a_fallback(engine, stored,
                                                                 report_tokens, monkeypatch):
    tenant, base = stored
    prompt = edit_of(base, 400, report_tokens[40:43])

    def broken(*args, **kwargs):
        raise RuntimeError("injected load failure")

    monkeypatch.setattr(engine.worker, "_load_runs", broken)
    filled = engine.run(prompt, tenant)
    monkeypatch.undo()
    vanilla = engine.run(prompt, tenant + "-vanilla")
    stats = report(filled)
    assert claimed_to_the_tail(filled)
    assert stats["fallback"] and stats["loaded"] == 0 and stats["reused"] == 0
    assert stats["recomputed"] == stats["claimed"]
    assert filled.outputs[0].token_ids == vanilla.outputs[0].token_ids


def test_a_similar_prompt_reuses_one_whose_save_is_in_flight(engine, report_tokens,
                                                              monkeypatch):
    """The disk is slow: the base's chunks are still queued when its edit arrives."""
    tenant, base = "in-flight", report_tokens[700:1300]
    store, gate = engine.worker.saves.store, threading.Event()
    slow_put = store.put

    def put(chunks):
        gate.wait()
        return slow_put(chunks)

    monkeypatch.setattr(store, "put", put)
    engine.run(base, tenant, max_tokens=1)
    edited = engine.run(edit_of(base, 333, report_tokens[3:6]), tenant)
    assert engine.scheduler._saving, "the base's save was not in flight"
    gate.set()
    engine.settle()
    assert claimed_to_the_tail(edited) and report(edited)["loaded"] > report(edited)["claimed"] // 2
    assert len(engine.entries(tenant)) == 2  # the base, then its edit


def sampling(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_a_claimed_request_is_preempted_resumed_and_refilled(engine, report_tokens):
    """Two long claimed requests outgrow the 20-block KV cache while decoding: vLLM
    preempts one, then resumes it, and the connector claims and fills it again."""
    engine, tenant = engine, "preempt"
    base = report_tokens[:1100]
    engine.run(base, tenant)
    engine.settle()
    llm_engine, scheduler = engine.llm.llm_engine, engine.engine_core.scheduler
    names = [f"preempt-{at}" for at in (60, 90)]  # edits in block 0: no shared block
    ids = [llm_engine.add_request(name, {"prompt_token_ids": edit_of(
               base, at, report_tokens[at + 7:at + 10]), "cache_salt": tenant}, sampling(200))
           for name, at in zip(names, (60, 90))]
    preempted: set[str] = set()

    def watch() -> None:
        preempted.update(i for i in ids if i in scheduler.requests
                         and scheduler.requests[i].num_preemptions)

    finished = step_until_done(llm_engine, watch)
    assert preempted, "the KV cache was large enough: nothing was preempted"
    for name in names:
        out = finished[name]
        assert len(out.outputs[0].token_ids) == 200
        assert report(out)["claimed"] > 0
    assert report(engine.run(edit_of(base, 600, report_tokens[1:4]), tenant))["claimed"]


def test_aborts_while_the_lookup_runs_and_after_the_load(engine, stored, report_tokens):
    from vllm.v1.request import RequestStatus

    tenant, base = stored
    llm_engine = engine.llm.llm_engine
    early = llm_engine.add_request("abort-early", {"prompt_token_ids": edit_of(
        base, 222, report_tokens[50:53]), "cache_salt": tenant}, sampling(8))
    llm_engine.step()  # the lookup is submitted; vLLM is told to ask again
    llm_engine.abort_request([early], internal=True)  # add_request returns vLLM's own id
    assert early not in engine.engine_core.scheduler.requests
    late = llm_engine.add_request("abort-late", {"prompt_token_ids": edit_of(
        base, 233, report_tokens[60:63]), "cache_salt": tenant}, sampling(8))
    requests = engine.engine_core.scheduler.requests
    while not (late in requests and requests[late].status == RequestStatus.RUNNING):
        llm_engine.step()  # until its load has ended and its prefill ran
    llm_engine.abort_request([late], internal=True)
    assert late not in requests or requests[late].is_finished()  # a save in flight holds it
    step_until_done(llm_engine)
    assert report(engine.run(edit_of(base, 244, report_tokens[70:73]), tenant))["claimed"]


def step_until(step, done) -> None:
    while not done():
        step()


def test_a_prompt_finishing_before_its_save_is_answered_keeps_its_blocks(engine,
                                                                         report_tokens):
    """The worker copies a prompt out of its blocks after the step that returns its
    first token, and stores it behind; vLLM frees a request done by then only once the
    save is answered, and its entry is on its way to the catalog by then (the catalog
    thread commits it)."""
    llm_engine, scheduler = engine.llm.llm_engine, engine.engine_core.scheduler
    free_before = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    req_id = llm_engine.add_request("copy-one-token", {
        "prompt_token_ids": report_tokens[100:700], "cache_salt": "copy"}, sampling(1))
    assert step_until_done(llm_engine)["copy-one-token"].finished
    assert req_id in scheduler.requests, "vLLM freed the blocks before the save ended"
    step_until(engine.engine_core.step, lambda: req_id not in scheduler.requests)
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free_before
    assert [e.token_ids.tolist() for e in engine.entries("copy")] == [report_tokens[100:700]]


def test_a_prompt_preempted_while_its_kv_is_copied_is_not_stored(engine, report_tokens):
    """Preemption frees the blocks the copy reads: that copy is dropped, never stored."""
    llm_engine, scheduler = engine.llm.llm_engine, engine.engine_core.scheduler
    prompt = report_tokens[200:800]
    req_id = llm_engine.add_request("copy-preempted", {
        "prompt_token_ids": prompt, "cache_salt": "copy-preempted"}, sampling(4))
    step_until(llm_engine.step, lambda: req_id in engine.scheduler._last_saves)
    request = scheduler.requests[req_id]
    scheduler.running.remove(request)
    scheduler._preempt_request(request, time.monotonic())  # as vLLM does when out of blocks
    finished = step_until_done(llm_engine)
    engine.settle()
    assert engine.entries("copy-preempted") == []
    again = engine.run(prompt, "copy-preempted-again", max_tokens=4)
    assert finished["copy-preempted"].outputs[0].token_ids == again.outputs[0].token_ids


def test_no_request_state_outlives_its_request(engine, stored):
    """Runs after the tests above (file order): every request they sent is gone."""
    engine.settle()
    scheduler = engine.scheduler
    assert scheduler._requests == {} and scheduler._late_reports == {}
    assert scheduler._saving == {} and engine.worker.saves.queued_bytes == 0
