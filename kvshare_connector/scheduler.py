"""Cache-aware scheduling for vLLM: ``--scheduler-cls kvshare.scheduler.CacheAwareScheduler``.

vLLM admits waiting requests first come, first served. With kvshare a request's cost
depends on what the cache holds: a hit costs a fill (its tail, the tokens the fill
recomputes, and loading the rest), a miss a full prefill, several times more. Admitting
the cheapest requests first lowers the mean time to first token, as shortest-job-first
does, and kvshare knows each cost once the request's lookup is done. So:

* **lookups start on arrival** (:meth:`CacheAwareScheduler.add_request`), on the
  connector's lookup thread, not when the request reaches the head of the queue;
* **waiting requests are ranked by predicted cost** (:func:`predicted_cost`, in
  prefill-token equivalents); costs within :data:`COST_BUCKET_RATIO` of each other count
  as equal, and among equals hits come first (so fills are admitted together, in the
  same steps) and then earlier arrivals;
* **aging**: a request that has waited ``scheduler_max_extra_wait_s`` is overtaken by no
  later arrival; from then on it is served first come, first served among the requests
  that waited as long (0 makes the scheduler FCFS);
* a request whose lookup still runs ranks as a miss (its cost can only fall once the
  lookup finds a hit); when it ranks first, admission waits for its lookup, at most
  ``scheduler_lookup_wait_s`` after its arrival, rather than let a request ranked behind
  it start first;
* **fills get a share of every step**: while fills are in flight, their predicted cost
  (at most half of vLLM's per-step token budget, :func:`fill_reserve`) is held back from
  the tokens vLLM schedules, and the connector's worker spends what the step leaves
  unused on the fills. Without it a saturated server, whose steps are full of prefill
  chunks, would leave its hits only ``fill_tokens_per_step``;
* **no preemption to reorder**: only the waiting queue is ranked. Running requests keep
  running; vLLM still preempts for lack of KV blocks, as it always does, and preempted
  requests resume before any other waiting request, as under FCFS.

Without the kvshare connector every request is a miss and the ranking is
shortest-prompt-first with the same aging bound. Under vLLM's ``priority`` policy the
scheduler refuses to start: it replaces that ordering.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue, SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from kvshare.config import KVShareConfig
from kvshare.matching.claim import Claim

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from kvshare.connector.scheduler import KVShareScheduler

FILL_COST_PER_CLAIMED_TOKEN = 0.11
"""Prefill-token equivalents a fill spends per claimed token besides the tokens it
recomputes: the check layers (DHD runs layers 0-1 for every claimed token, 2 of
SmolLM2's 30 layers: 0.067) plus loading and re-rotating the chunks (0.04). Measured with
``kvshare bench ttft`` (eager, 40 similar-stream prompts of mean 1,384 tokens; BENCHMARKS.md):
a miss prefills at 0.79 ms per token (1,098 ms median), a hit took 367 ms, i.e. 464 token
equivalents, for about 1,350 claimed tokens of which about 284 recomputed and a 33-token
tail: 33 + 284 + 0.11 x 1,350 = 466."""
MAX_FILL_SHARE = 0.5
"""At most this share of vLLM's per-step token budget is held back for fills in flight:
misses keep at least half of every step."""
COST_BUCKET_RATIO = 1.25
"""Predicted costs within this factor of each other rank as equal (the model is not more
precise than that); ties go to hits, then to earlier arrivals."""


@dataclass(frozen=True)
class Prediction:
    """What admitting a waiting request will cost, as far as its lookup tells."""

    cost: float
    """Prefill-token equivalents until its first token (a miss: its prompt tokens)."""
    hit: bool
    """kvshare will fill part of its prompt."""


def fill_cost(claim: Claim, rho: float) -> float:
    """Prefill-token equivalents of the fill of ``claim`` when it recomputes ``rho`` of the
    reused tokens."""
    recomputed = claim.num_claimed - claim.expected_reused(rho)
    return recomputed + FILL_COST_PER_CLAIMED_TOKEN * claim.num_claimed


def predicted_cost(prompt_tokens: int, claim: Claim, rho: float) -> Prediction:
    """The cost of a request of ``prompt_tokens`` whose claim (without a vLLM prefix hit)
    is ``claim`` and whose fill recomputes ``rho`` of the reused tokens."""
    if claim.num_claimed == 0:
        return Prediction(float(prompt_tokens), hit=False)
    uncached = prompt_tokens - claim.num_claimed
    return Prediction(uncached + fill_cost(claim, rho), hit=True)


def fill_reserve(claims: Iterable[Claim], rho: float, token_budget: int) -> int:
    """Tokens of vLLM's per-step budget to leave to the fills of ``claims``: their cost,
    at most :data:`MAX_FILL_SHARE` of the budget. The connector's worker gives the fills
    what vLLM's step leaves unused, so without a reserve a saturated server (every step
    full of prefill chunks) leaves its hits the ``fill_tokens_per_step`` minimum."""
    cost = sum(fill_cost(claim, rho) for claim in claims)
    return min(math.ceil(cost), int(MAX_FILL_SHARE * token_budget))


class CacheAwareQueue(RequestQueue):
    """vLLM's waiting queue, ranked as the module docstring says.

    The ranking is computed once per scheduling pass (:meth:`scheduling_pass`) and after
    every arrival or removal, not per peek: vLLM peeks a request, then pops "it", and both
    must be the same request even if a lookup finished or a request aged in between.

    ``predict`` answers a request's :class:`Prediction`, or None while its lookup runs;
    answers are kept once given. ``clock`` is the clock of ``Request.arrival_time``.
    """

    def __init__(self, predict: Callable[[Request], Prediction | None], *,
                 max_extra_wait_s: float, lookup_wait_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        if max_extra_wait_s < 0 or lookup_wait_s < 0:
            raise ValueError(f"max_extra_wait_s ({max_extra_wait_s}) and lookup_wait_s "
                             f"({lookup_wait_s}) must be seconds >= 0")
        self.max_extra_wait_s = max_extra_wait_s
        self.lookup_wait_s = lookup_wait_s
        self._predict = predict
        self._clock = clock
        self._waiting: list[Request] = []
        """Arrival order (stable among requests of equal arrival time)."""
        self._predictions: dict[str, Prediction] = {}
        self._ranked: list[Request] | None = None
        self._in_pass = False

    # ------------------------------------------------------------------ ranking
    def rank_key(self, request: Request, now: float) -> tuple[Any, ...]:
        """Smaller first: preempted requests, then requests past the aging bound (in
        arrival order), then by cost bucket, hits before misses, arrival."""
        if request.status == RequestStatus.PREEMPTED:
            return (0, request.arrival_time)
        if now - request.arrival_time >= self.max_extra_wait_s:
            return (1, request.arrival_time)
        prediction = self.prediction(request)
        cost = prediction.cost if prediction is not None else float(request.num_prompt_tokens)
        bucket = math.floor(math.log(max(cost, 1.0), COST_BUCKET_RATIO))
        hit = prediction is not None and prediction.hit
        return (2, bucket, not hit, request.arrival_time)

    def prediction(self, request: Request) -> Prediction | None:
        """The request's prediction, or None while its lookup runs."""
        known = self._predictions.get(request.request_id)
        if known is None:
            known = self._predict(request)
            if known is not None:
                self._predictions[request.request_id] = known
        return known

    def _rank(self) -> list[Request]:
        if self._ranked is None:
            now = self._clock()
            order = {id(request): i for i, request in enumerate(self._waiting)}
            self._ranked = sorted(self._waiting, key=lambda r: (self.rank_key(r, now),
                                                                 order[id(r)]))
        return self._ranked

    def _holding(self) -> bool:
        """Whether admission waits for the lookup of the request ranked first."""
        if not self._waiting:
            return False
        head = self._rank()[0]
        return (head.status != RequestStatus.PREEMPTED and self.prediction(head) is None
                and self._clock() - head.arrival_time < self.lookup_wait_s)

    @contextmanager
    def scheduling_pass(self) -> Iterator[None]:
        """One ranking for the pass; while it lasts the queue reads as empty when the
        request ranked first holds admission (vLLM stops admitting at an empty queue)."""
        self._ranked = None
        self._in_pass = True
        try:
            yield
        finally:
            self._in_pass = False

    # ------------------------------------------------------------------ RequestQueue
    def add_request(self, request: Request) -> None:
        self._waiting.append(request)
        self._ranked = None

    def pop_request(self) -> Request:
        if not self._waiting:
            raise IndexError("pop from an empty queue")
        request = self._rank().pop(0)
        self._waiting.remove(request)
        self._predictions.pop(request.request_id, None)
        return request

    def peek_request(self) -> Request:
        if not self._waiting:
            raise IndexError("peek from an empty queue")
        return self._rank()[0]

    def prepend_request(self, request: Request) -> None:
        """A preempted request (or one vLLM skipped this pass) goes back by its rank:
        preempted requests rank first, skipped ones keep their place."""
        self.add_request(request)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.add_request(request)

    def remove_request(self, request: Request) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[Request]) -> None:
        gone = {id(request) for request in requests}
        for request in self._waiting:
            if id(request) in gone:
                self._predictions.pop(request.request_id, None)
        self._waiting = [r for r in self._waiting if id(r) not in gone]
        self._ranked = None

    def __bool__(self) -> bool:
        return bool(self._waiting) and not (self._in_pass and self._holding())

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._rank()))


def kvshare_config_of(vllm_config: VllmConfig) -> KVShareConfig:
    """The kvshare config: the connector's (its extra config) when vLLM runs kvshare's
    connector, else defaults < YAML < ``KVSHARE_*`` environment."""
    from kvshare.connector.connector import load_config

    if vllm_config.kv_transfer_config is not None:
        return load_config(vllm_config)
    return KVShareConfig.load()


class CacheAwareMixin:
    """The cache-aware waiting queue and arrival-time lookups, on top of a vLLM scheduler."""

    waiting: CacheAwareQueue

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.policy != SchedulingPolicy.FCFS:
            raise ValueError(
                f"kvshare's CacheAwareScheduler ranks waiting requests itself; it runs with "
                f"vLLM's fcfs policy, got --scheduling-policy {self.policy.value}")
        config = kvshare_config_of(self.vllm_config)
        self.kvshare_config = config
        self._claims = _kvshare_claims(self.connector)
        self.waiting = CacheAwareQueue(self._predict,
                                       max_extra_wait_s=config.scheduler_max_extra_wait_s,
                                       lookup_wait_s=config.scheduler_lookup_wait_s)

    def add_request(self, request: Request) -> None:
        new = request.request_id not in self.requests
        super().add_request(request)
        if new and self._claims is not None:
            self._claims.prefetch(request)

    def schedule(self, *args: Any, **kwargs: Any):
        """vLLM's pass over the ranked queue, with the fills' reserve held back from its
        token budget (:func:`fill_reserve`)."""
        token_budget = self.max_num_scheduled_tokens
        if self._claims is not None:
            self.max_num_scheduled_tokens -= fill_reserve(
                self._claims.claims_filling(), self.kvshare_config.rho, token_budget)
        try:
            with self.waiting.scheduling_pass():
                return super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = token_budget

    def _predict(self, request: Request) -> Prediction | None:
        if self._claims is None:
            return Prediction(float(request.num_prompt_tokens), hit=False)
        claim = self._claims.expected_claim(request)
        if claim is None:
            return None
        return predicted_cost(request.num_prompt_tokens, claim, self.kvshare_config.rho)


class CacheAwareScheduler(CacheAwareMixin, Scheduler):
    """vLLM's scheduler with kvshare's cache-aware waiting queue (see the module docstring).

    ``--scheduler-cls kvshare.scheduler.CacheAwareScheduler``; vLLM CPU always schedules
    synchronously. With asynchronous scheduling (vLLM's default on GPUs) use
    :class:`CacheAwareAsyncScheduler`.
    """


class CacheAwareAsyncScheduler(CacheAwareMixin, AsyncScheduler):
    """:class:`CacheAwareScheduler` for vLLM's asynchronous scheduling."""


def _kvshare_claims(connector: object | None) -> KVShareScheduler | None:
    """The kvshare connector's scheduler half, or None when vLLM runs another connector or
    none."""
    from kvshare.connector.connector import KVShareConnector

    if isinstance(connector, KVShareConnector):
        return connector.claims
    return None
