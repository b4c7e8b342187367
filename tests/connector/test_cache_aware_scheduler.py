"""kvshare's cache-aware scheduler: ranking of the waiting queue, aging bound, and a real
vLLM engine started with ``scheduler_cls="kvshare.scheduler.CacheAwareScheduler"``."""

from __future__ import annotations

import math
import random

import pytest
from engines import spawn_engines_in_children
from vllm import SamplingParams
from vllm.v1.request import Request, RequestStatus

from kvshare.config import KVShareConfig
from kvshare.connector.scheduler import STORE_ARG
from kvshare.matching.claim import Claim
from kvshare.scheduler import (
    FILL_COST_PER_CLAIMED_TOKEN,
    CacheAwareMixin,
    CacheAwareQueue,
    Prediction,
    fill_cost,
    fill_reserve,
    predicted_cost,
)


class Clock:
    """The queue's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def request(name: str, arrival: float, prompt_tokens: int = 100) -> Request:
    return Request(name, [1] * prompt_tokens, SamplingParams(max_tokens=1), None,
                   arrival_time=arrival)


def queue_of(predictions: dict[str, Prediction | None], clock: Clock, *,
             max_extra_wait_s: float = 10.0, lookup_wait_s: float = 0.05) -> CacheAwareQueue:
    return CacheAwareQueue(lambda r: predictions[r.request_id], clock=clock,
                           max_extra_wait_s=max_extra_wait_s, lookup_wait_s=lookup_wait_s)


def drain(queue: CacheAwareQueue) -> list[str]:
    order = []
    while len(queue):
        with queue.scheduling_pass():
            order.append(queue.pop_request().request_id)
    return order


def test_a_hit_costs_its_tail_its_recompute_and_a_share_per_loaded_token():
    miss = predicted_cost(1400, Claim(0, 0, 0), rho=0.15)
    assert miss == Prediction(1400.0, hit=False)
    hit = predicted_cost(1400, Claim(0, 1367, 1200), rho=0.15)
    recomputed = 1367 - Claim(0, 1367, 1200).expected_reused(0.15)
    assert hit.hit
    assert hit.cost == pytest.approx(33 + recomputed + FILL_COST_PER_CLAIMED_TOKEN * 1367)
    assert hit.cost < miss.cost / 2


def test_fills_in_flight_reserve_their_cost_up_to_half_the_budget():
    claim = Claim(0, 1367, 1200)
    assert fill_reserve([], 0.15, 2048) == 0
    assert fill_reserve([claim], 0.15, 2048) == math.ceil(fill_cost(claim, 0.15))
    assert fill_reserve([claim] * 10, 0.15, 2048) == 1024


class RecordingScheduler:
    """Stands in for vLLM's scheduler: records the token budget its pass saw."""

    def schedule(self) -> int:
        return self.max_num_scheduled_tokens


class Filling:
    """The connector's scheduler half, as far as the reserve asks it."""

    def __init__(self, claims: list[Claim]) -> None:
        self.claims = claims

    def claims_filling(self) -> list[Claim]:
        return self.claims


def test_the_pass_schedules_within_the_budget_less_the_reserve_then_restores_it():
    class Scheduler(CacheAwareMixin, RecordingScheduler):
        def __init__(self, claims: list[Claim]) -> None:  # not vLLM's: no engine here
            self.max_num_scheduled_tokens = 2048
            self.kvshare_config = KVShareConfig()
            self._claims = Filling(claims)
            self.waiting = queue_of({}, Clock())

    claim = Claim(0, 1367, 1200)
    filling = Scheduler([claim])
    assert filling.schedule() == 2048 - fill_reserve([claim], 0.15, 2048)
    assert filling.max_num_scheduled_tokens == 2048
    assert Scheduler([]).schedule() == 2048


def test_cheaper_predicted_cost_first_and_fcfs_among_equals():
    clock = Clock()
    predictions = {"long-miss": Prediction(1400, False), "hit-a": Prediction(400, True),
                   "short-miss": Prediction(150, False), "hit-b": Prediction(410, True),
                   "hit-c": Prediction(150, True)}
    queue = queue_of(predictions, clock)
    for i, name in enumerate(predictions):
        queue.add_request(request(name, arrival=i * 0.01))
    clock.now = 0.1
    # 150-cost requests tie (hits first), hit-a and hit-b tie (arrival order).
    assert drain(queue) == ["hit-c", "short-miss", "hit-a", "hit-b", "long-miss"]


def test_with_a_zero_bound_the_queue_is_first_come_first_served():
    clock = Clock()
    predictions = {f"r{i}": Prediction(cost, cost < 500)
                   for i, cost in enumerate([1400, 200, 900, 50, 600])}
    queue = queue_of(predictions, clock, max_extra_wait_s=0.0)
    for i, name in enumerate(predictions):
        queue.add_request(request(name, arrival=float(i)))
    clock.now = 10.0
    assert drain(queue) == list(predictions)


def test_no_request_is_overtaken_once_it_has_waited_the_bound():
    """A saturated single server: Poisson arrivals, service time proportional to cost.
    Whenever a request is admitted past an earlier arrival, that one had waited less
    than the bound; and the ranking does reorder (else the test shows nothing)."""
    rng = random.Random(7)
    bound, per_token_s = 3.0, 0.001
    clock = Clock()
    arrivals, predictions, t = [], {}, 0.0
    for i in range(300):
        t += rng.expovariate(1.6)  # about 1.4x the service rate
        hit = rng.random() < 0.5
        cost = rng.uniform(100, 500) if hit else rng.uniform(400, 1500)
        arrivals.append((f"r{i}", t))
        predictions[f"r{i}"] = Prediction(cost, hit)
    queue = queue_of(predictions, clock, max_extra_wait_s=bound)
    arrival_of = dict(arrivals)
    pending = list(arrivals)
    admitted: list[tuple[str, float]] = []
    while pending or len(queue):
        while pending and pending[0][1] <= clock.now:
            name, at = pending.pop(0)
            queue.add_request(request(name, at))
        if not len(queue):
            clock.now = pending[0][1]
            continue
        with queue.scheduling_pass():
            name = queue.pop_request().request_id
        admitted.append((name, clock.now))
        clock.now += predictions[name].cost * per_token_s
    overtaken = 0
    for position, (name, at) in enumerate(admitted):
        for earlier, _ in admitted[position + 1:]:
            if arrival_of[earlier] < arrival_of[name]:
                overtaken += 1
                assert at - arrival_of[earlier] < bound, (name, earlier)
    assert overtaken > 50


def test_a_request_whose_lookup_runs_ranks_as_a_miss_and_holds_admission_briefly():
    clock = Clock()
    predictions: dict[str, Prediction | None] = {"miss": Prediction(1400, False),
                                                 "looking-up": None}
    queue = queue_of(predictions, clock, lookup_wait_s=0.05)
    queue.add_request(request("miss", 0.0, prompt_tokens=1400))
    queue.add_request(request("looking-up", 0.01, prompt_tokens=600))
    clock.now = 0.02
    with queue.scheduling_pass():
        assert not queue  # vLLM admits nothing behind it this pass
    assert queue and len(queue) == 2  # outside a pass the queue is what it holds
    predictions["looking-up"] = Prediction(200, True)
    with queue.scheduling_pass():
        assert queue and queue.peek_request().request_id == "looking-up"
    predictions["other"] = None
    queue.add_request(request("other", 0.03, prompt_tokens=300))
    clock.now = 0.03 + 0.05  # its lookup wait is over: vLLM may skip it and go on
    with queue.scheduling_pass():
        assert queue and queue.peek_request().request_id == "looking-up"
        queue.pop_request()
        assert queue.peek_request().request_id == "other"


def test_peek_and_pop_agree_although_a_lookup_finished_in_between():
    clock = Clock()
    predictions: dict[str, Prediction | None] = {"a": Prediction(500, False), "b": None}
    queue = queue_of(predictions, clock, lookup_wait_s=0.0)
    queue.add_request(request("a", 0.0, prompt_tokens=500))
    queue.add_request(request("b", 0.0, prompt_tokens=800))
    with queue.scheduling_pass():
        peeked = queue.peek_request()
        predictions["b"] = Prediction(50, True)
        assert queue.pop_request() is peeked
        assert peeked.request_id == "a"


def test_preempted_requests_resume_first_and_skipped_ones_keep_their_place():
    clock = Clock()
    predictions = {"cheap": Prediction(100, True), "dear": Prediction(1000, False),
                   "preempted": Prediction(2000, False)}
    queue = queue_of(predictions, clock)
    queue.add_request(request("cheap", 1.0))
    queue.add_request(request("dear", 2.0))
    preempted = request("preempted", 3.0)
    preempted.status = RequestStatus.PREEMPTED
    with queue.scheduling_pass():
        skipped = queue.pop_request()
        assert skipped.request_id == "cheap"
        queue.prepend_requests([skipped])
    queue.prepend_request(preempted)
    assert [r.request_id for r in queue] == ["preempted", "cheap", "dear"]
    queue.remove_requests([skipped])
    assert [r.request_id for r in queue] == ["preempted", "dear"]


def test_bad_bounds_are_named():
    with pytest.raises(ValueError, match="max_extra_wait_s"):
        CacheAwareQueue(lambda r: None, max_extra_wait_s=-1.0, lookup_wait_s=0.0)


# ---------------------------------------------------------------------- real engine
MAX_EXTRA_WAIT_S = 5.0
"""The engine's aging bound: longer than the lookups and fills of the reordering test,
shorter than the hits of the aging test take together."""
CLOCK_SLACK_S = 0.1
"""vLLM stamps SCHEDULED at the start of a pass, a moment after the queue's ranking."""


def text_tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def report(branch: int, items: int = 14) -> str:
    return f"Quarterly review of branch {branch}. Answer the question at the end.\n" + " ".join(
        f"Item {i}: branch {branch} reports revenue of {1000 + 37 * i + branch} dollars, "
        f"costs of {400 + 11 * i} dollars and {i % 5} new hires." for i in range(items))


STORIES = (["the lighthouse keeper", "walked along the cliffs", "while gulls circled",
            "over grey water,", "thinking of winter", "and the letters", "she never sent;"],
           ["a caravan of traders", "crossed the salt flats", "under a copper sky,",
            "their camels tired", "and their songs", "slower every night;"])


def story(pieces: list[str], tokens: int, tokenizer) -> list[int]:
    """A long prompt sharing no run of tokens worth reusing with the reports."""
    text = " ".join(pieces[(i * 5) % len(pieces)] + f" ({chr(97 + i % 26)})"
                    for i in range(tokens // 3))
    return text_tokens(tokenizer, text)[:tokens]


@pytest.fixture(scope="module")
def cache_aware_engine(tmp_path_factory):
    """One vLLM engine (EngineCore in a spawned child, as users run it) with kvshare's
    connector and ``scheduler_cls`` set; one request runs at a time (``max_num_seqs=1``),
    so the order in which requests get the seat is the order the scheduler admits them."""

    from vllm import LLM
    from vllm.config import KVTransferConfig

    from kvshare.config import KVShareConfig
    from kvshare.model_assets import resolve_model_dir

    spawn_engines_in_children()
    home = tmp_path_factory.mktemp("kvshare-cache-aware")
    extra = {"home": str(home), "cpu_bytes": 0, "disk_dir": str(home / "chunks"),
             "share_public_scope": False, "shadow_sample_rate": 0.0,
             "scheduler_max_extra_wait_s": MAX_EXTRA_WAIT_S,
             # Under test the host is shared; a slow lookup must not reorder by chance.
             "scheduler_lookup_wait_s": 5.0}
    if "fill_mode" in KVShareConfig.__dataclass_fields__:
        extra["fill_mode"] = "sync"  # an asynchronous fill does not hold the one seat
    llm = LLM(model=str(resolve_model_dir("smollm2-135m-instruct")), enforce_eager=True,
              gpu_memory_utilization=0.3, max_model_len=2048, max_num_batched_tokens=2048,
              max_num_seqs=1, seed=0, disable_log_stats=False,
              kv_cache_memory_bytes=256 << 20,  # about 11k tokens: a fixed, small reservation
              scheduler_cls="kvshare.scheduler.CacheAwareScheduler",
              kv_transfer_config=KVTransferConfig(
                  kv_connector="KVShareConnector", kv_connector_module_path="kvshare.connector",
                  kv_role="kv_both", kv_load_failure_policy="recompute",
                  kv_connector_extra_config=extra))
    yield llm
    llm.llm_engine.engine_core.shutdown()


def submit_together(llm, prompts: list[tuple[list[int], int]], tenant: str, *,
                    store_first: bool = False):
    """Submit ``(token ids, max_tokens)`` prompts in one call, in list order; one
    RequestOutput each, in that order. The first prompt (a miss) is not stored unless
    ``store_first``: later misses must not hit it."""
    batch = [{"prompt_token_ids": ids, "cache_salt": tenant} for ids, _ in prompts]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                             extra_args={STORE_ARG: 0} if i == 0 and not store_first else None)
              for i, (_, n) in enumerate(prompts)]
    return llm.generate(batch, params, use_tqdm=False)


def claimed(output) -> int:
    return ((output.kv_transfer_params or {}).get("kvshare") or {}).get("claimed", 0)


def assert_never_overtaken_past_the_bound(outputs) -> None:
    """Whenever a later arrival was admitted before an earlier one, the earlier one had
    waited less than the bound (engine-core timestamps: queued and scheduled)."""
    for a_index, a in enumerate(outputs):
        for b in outputs[a_index + 1:]:
            if b.metrics.scheduled_ts < a.metrics.scheduled_ts:
                waited = b.metrics.scheduled_ts - a.metrics.queued_ts
                assert waited < MAX_EXTRA_WAIT_S + CLOCK_SLACK_S, (a.request_id, b.request_id)


@pytest.mark.engine
def test_hits_submitted_after_a_long_miss_get_their_first_tokens_first_within_the_bound(
        cache_aware_engine, tokenizer):
    llm, tenant = cache_aware_engine, "cache-aware"
    sources = [text_tokens(tokenizer, report(branch)) for branch in (1, 2, 3)]
    submit_together(llm, [(ids, 2) for ids in sources], tenant, store_first=True)

    def edited(ids: list[int], at: int) -> list[int]:
        return ids[:at] + text_tokens(tokenizer, " nine") + ids[at + 1:]

    long_miss = story(STORIES[0], 1500, tokenizer)
    assert all(len(ids) < len(long_miss) // 2 for ids in sources)

    # Reordering: the long miss arrives first, three hits after it. The hits get the
    # seat first, until the miss has waited the bound (only on a very slow host).
    hits = [edited(ids, 200) for ids in sources]
    outputs = submit_together(llm, [(long_miss, 2)] + [(ids, 2) for ids in hits], tenant)
    assert claimed(outputs[0]) == 0 and all(claimed(out) > 0 for out in outputs[1:])
    miss = outputs[0].metrics
    timeline = [(out.request_id, round(out.metrics.scheduled_ts - miss.queued_ts, 3),
                 round(out.metrics.first_token_ts - miss.queued_ts, 3)) for out in outputs]
    assert outputs[1].metrics.first_token_ts < miss.first_token_ts, timeline
    if any(out.metrics.first_token_ts > miss.first_token_ts for out in outputs[1:]):
        assert miss.scheduled_ts - miss.queued_ts > MAX_EXTRA_WAIT_S - CLOCK_SLACK_S, timeline
    assert_never_overtaken_past_the_bound(outputs)

    # Aging: a long miss, then hits that together hold the seat for longer than the
    # bound; the miss is admitted within it and the hits after that wait behind it.
    hits = [edited(sources[i % 3], 120 + 10 * i) for i in range(10)]
    long_miss = story(STORIES[1], 1500, tokenizer)
    outputs = submit_together(llm, [(long_miss, 2)] + [(ids, 96) for ids in hits], tenant)
    assert claimed(outputs[0]) == 0 and all(claimed(out) > 0 for out in outputs[1:])
    assert_never_overtaken_past_the_bound(outputs)
    miss = outputs[0].metrics
    overtook = [out for out in outputs[1:] if out.metrics.scheduled_ts < miss.scheduled_ts]
    timeline = [(out.request_id, round(out.metrics.scheduled_ts - miss.queued_ts, 3))
                for out in outputs]
    assert 0 < len(overtook) < len(hits), timeline
    # No request was preempted to reorder the queue.
    preemptions = [m for m in llm.get_metrics() if m.name == "vllm:num_preemptions"]
    assert preemptions and all(m.value == 0 for m in preemptions)
