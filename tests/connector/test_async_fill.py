"""Fills inside the step budget: a hit's fill advances a slice per step while other
requests keep decoding (``fill_mode: async``, the default).

On the in-process engine (``conftest.py``), stepped request by request. Each test works
in tenants of its own that all hold the same stored base, so the same edit gets the same
plan, and a fill in one mode can be compared with a fill in the other.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from test_robustness import edit_of, report, sampling, step_until_done

pytestmark = pytest.mark.engine

FILL_TOKENS_PER_STEP = 200
"""A small slice, so that a 600-token edit's fill spans several steps."""
REPORTED = ("claimed", "loaded", "recomputed", "reused", "fallback", "sources", "depth",
            "source_depth")


@pytest.fixture(scope="module")
def base(report_tokens) -> list[int]:
    return report_tokens[300:900]


@pytest.fixture(scope="module")
def hit(base, report_tokens) -> list[int]:
    return edit_of(base, 300, report_tokens[11:14])


@pytest.fixture(scope="module")
def runner_prompt(report_tokens) -> list[int]:
    """A short prompt whose request decodes while the hits are filled."""
    return report_tokens[1000:1100]


@pytest.fixture
def tenant(engine, base, request) -> str:
    """A fresh tenant holding the stored base."""
    name = f"async-{request.node.name}"
    engine.run(base, name)
    engine.settle()
    return name


@pytest.fixture
def small_slices(engine, monkeypatch) -> None:
    """Fills get only ``fill_tokens_per_step`` per step, as beside steps that use vLLM's
    whole token budget (here vLLM's budget counts as used up)."""
    monkeypatch.setattr(engine.scheduler, "config", replace(
        engine.scheduler.config, fill_tokens_per_step=FILL_TOKENS_PER_STEP))
    monkeypatch.setattr(engine.scheduler, "_step_tokens", 0)


class Watch:
    """Steps the engine and records, after each step, the fills in flight and how many
    tokens each request has produced so far. Requests go by vLLM's internal ids (what
    ``add`` returns), which the connector sees."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.llm_engine = engine.llm.llm_engine
        self._internal: dict[str, str] = {}
        """The id a request was added under -> vLLM's internal id."""
        self.tokens: dict[str, int] = {}
        self.finished: dict[str, object] = {}
        self.steps: list[tuple[set[str], dict[str, int], int]] = []
        """Per step: fills in flight after it, tokens per request, fill work done."""

    def add(self, req_id: str, prompt: list[int], tenant: str, max_tokens: int) -> str:
        internal = self.llm_engine.add_request(req_id, {"prompt_token_ids": prompt,
                                                        "cache_salt": tenant},
                                               sampling(max_tokens))
        self._internal[req_id] = internal
        return internal

    def step(self) -> None:
        for out in self.llm_engine.step():
            internal = self._internal[out.request_id]
            self.tokens[internal] = len(out.outputs[0].token_ids)
            if out.finished:
                self.finished[internal] = out
        fills = self.engine.worker.fills
        self.steps.append((set(fills.in_flight), dict(self.tokens), fills.last_step_work))

    def until(self, done, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if done():
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} engine steps")

    def start_runner(self, prompt: list[int], tenant: str, max_tokens: int = 1500) -> str:
        """A request decoding from now on: fills run to their end in a step that computes
        no request, so the tests keep one running."""
        runner = self.add(f"{tenant}-runner", prompt, f"{tenant}-runner", max_tokens)
        self.until(lambda: self.tokens.get(runner, 0) >= 2)
        return runner

    def stop(self, runner: str) -> None:
        self.llm_engine.abort_request([runner], internal=True)
        step_until_done(self.llm_engine)

    def decoded_while_filling(self, runner: str, hit: str) -> list[int]:
        """Tokens the runner produced in each step after which the hit's fill was still in
        flight."""
        produced, before = [], None
        for in_flight, tokens, _ in self.steps:
            if hit in in_flight and before is not None:
                produced.append(tokens.get(runner, 0) - before)
            before = tokens.get(runner, 0)
        return produced


def hit_beside_a_decoding_request(engine, tenant, hit, runner_prompt
                                  ) -> tuple[Watch, object, tuple[str, str]]:
    """The hit arrives while another request decodes; returns the watch, the hit's output
    and the (runner, hit) ids. The runner is aborted once the hit is answered."""
    watch = Watch(engine)
    runner = watch.start_runner(runner_prompt, tenant, 400)
    hit_id = watch.add(f"{tenant}-hit", hit, tenant, 8)
    watch.until(lambda: hit_id in watch.finished)
    watch.stop(runner)
    return watch, watch.finished[hit_id], (runner, hit_id)


def test_a_running_request_decodes_while_a_hit_is_filled(engine, base, hit, runner_prompt,
                                                         small_slices, monkeypatch):
    """Async: the runner gains a token in every step of the fill, the fill's work per step
    stays within the slice (plus the layer that crosses it); sync: the fill ends in the
    step that received it. Both fills answer alike and report alike."""
    engine.run(base, "async-a")
    engine.run(base, "async-s")
    engine.settle()
    watch, filled, ids = hit_beside_a_decoding_request(engine, "async-a", hit, runner_prompt)
    decoded = watch.decoded_while_filling(*ids)
    assert len(decoded) >= 3, f"the fill spanned {len(decoded)} steps"
    assert all(tokens == 1 for tokens in decoded), decoded
    largest_layer = len(hit)  # a layer computes at most every position of the prompt
    assert all(work <= FILL_TOKENS_PER_STEP + largest_layer for _, _, work in watch.steps)

    monkeypatch.setattr(engine.scheduler, "config",
                        replace(engine.scheduler.config, fill_mode="sync"))
    sync_watch, sync_filled, sync_ids = hit_beside_a_decoding_request(engine, "async-s", hit,
                                                                      runner_prompt)
    assert sync_watch.decoded_while_filling(*sync_ids) == []
    assert report(filled)["claimed"] > 0 and not report(filled)["fallback"]
    assert {k: report(filled)[k] for k in REPORTED} == {k: report(sync_filled)[k]
                                                          for k in REPORTED}
    assert filled.outputs[0].token_ids == sync_filled.outputs[0].token_ids
    assert filled.num_cached_tokens == sync_filled.num_cached_tokens


def test_fills_take_the_token_budget_the_step_leaves_unused(engine, base, hit, runner_prompt):
    """Beside a request decoding one token per step, a fill may do the model work of the
    rest of vLLM's token budget: it ends within a step or two of its chunks arriving."""
    engine.run(base, "async-idle")
    engine.settle()
    watch, filled, ids = hit_beside_a_decoding_request(engine, "async-idle", hit,
                                                       runner_prompt)
    scheduler = engine.scheduler
    unused = (scheduler._step_tokens - 1) * scheduler._num_layers
    work = [work for _, _, work in watch.steps if work]
    assert max(work) > FILL_TOKENS_PER_STEP, "the fill kept to the minimum slice"
    assert all(w <= unused + len(hit) for w in work)  # + the layer that crosses it
    assert report(filled)["claimed"] > 0 and not report(filled)["fallback"]


def test_an_abort_during_a_fill_drops_it_before_vllm_frees_its_blocks(engine, tenant, hit,
                                                                      runner_prompt,
                                                                      small_slices):
    scheduler = engine.engine_core.scheduler
    free_before = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    watch = Watch(engine)
    runner = watch.start_runner(runner_prompt, tenant)
    hit_id = watch.add("abort-during-fill", hit, tenant, 8)
    watch.until(lambda: hit_id in engine.worker.fills.in_flight)
    watch.llm_engine.abort_request([hit_id], internal=True)
    # vLLM holds the blocks of a request waiting for its load until the worker names it.
    watch.until(lambda: hit_id not in scheduler.requests)
    assert hit_id not in engine.worker.fills.in_flight
    assert not engine.scheduler._fills_in_flight
    watch.stop(runner)
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free_before
    again = engine.run(hit, tenant)
    assert report(again)["claimed"] > 0 and not report(again)["fallback"]


def test_a_request_preempted_during_a_fill_resumes_and_the_fill_completes(
        engine, tenant, hit, runner_prompt, small_slices):
    """vLLM never preempts a request waiting for its load, only running ones: here the
    decoding request is preempted (as vLLM does when out of blocks) mid-fill."""
    scheduler = engine.engine_core.scheduler
    watch = Watch(engine)
    runner = watch.start_runner(runner_prompt, tenant, 24)
    hit_id = watch.add("hit-beside-preemption", hit, tenant, 8)
    watch.until(lambda: hit_id in engine.worker.fills.in_flight)
    request = scheduler.requests[runner]
    before = watch.tokens[runner]
    scheduler.running.remove(request)
    scheduler._preempt_request(request, time.monotonic())
    watch.until(lambda: {runner, hit_id} <= set(watch.finished))
    assert request.num_preemptions == 1
    filled = watch.finished[hit_id]
    assert report(filled)["claimed"] > 0 and not report(filled)["fallback"]
    assert len(filled.outputs[0].token_ids) == 8
    # The runner resumes where it was. Its later tokens are not compared: vLLM recomputes
    # a resumed request's decoded tokens as one prefill chunk, whose other GEMM shapes
    # may change a later greedy token (vanilla vLLM too).
    alone = engine.run(runner_prompt, tenant + "-alone", max_tokens=24)
    answer = watch.finished[runner].outputs[0].token_ids
    assert len(answer) == 24 and answer[:before] == alone.outputs[0].token_ids[:before]


def test_fills_in_flight_are_capped(engine, tenant, hit, base, report_tokens, runner_prompt,
                                    small_slices, monkeypatch):
    monkeypatch.setattr(engine.scheduler, "config",
                        replace(engine.scheduler.config, max_fills_in_flight=1))
    watch = Watch(engine)
    runner = watch.start_runner(runner_prompt, tenant)
    ids = [watch.add(f"capped-{at}", edit_of(base, at, report_tokens[at:at + 3]), tenant, 4)
           for at in (310, 330, 350)]
    watch.until(lambda: set(ids) <= set(watch.finished))
    watch.stop(runner)
    assert max(len(in_flight) for in_flight, _, _ in watch.steps) == 1
    filled_in = [next(i for i, (in_flight, _, _) in enumerate(watch.steps) if req in in_flight)
                 for req in ids]
    assert len(set(filled_in)) == 3, "two fills started in the same step"
    for req in ids:
        assert report(watch.finished[req])["claimed"] > 0
    assert not engine.scheduler._fills_in_flight and not engine.worker.fills.in_flight
