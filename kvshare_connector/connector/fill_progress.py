"""Fills in flight: each claimed request's fill advanced by a bounded slice per engine step.

A fill (load the sources' chunks, re-rotate, selectively recompute, write the blocks)
costs about as much as a short prefill. Run whole inside ``start_load_kv`` it stalls
every running request for its full duration, outside vLLM's token budget. It cannot run
beside the step on a thread of its own either: vLLM's modules are not thread-safe (on
CPU the linear layers exist only in oneDNN's packed form, shared with the forward), so
the model work must stay on the thread that runs vLLM's forward. So a fill is a
resumable computation, a generator over the model's layers (:data:`FillSteps`), and
:class:`FillProgress` advances the fills in flight by at most ``budget`` token-layers of
model work per step (whole layers, at least one per step), in arrival order. Chunk loads
touch no model and run on a thread: a fill waiting for them yields their future and is
passed over until it is done.

With vLLM's asynchronous load (``load_kv_async``) the request waits in
``WAITING_FOR_REMOTE_KVS`` meanwhile, holding its blocks, and the worker names it in
``get_finished`` once its fill is complete. A fill sent synchronously runs to its end in
the step it arrives (vLLM computes its request in that very step).

Invariants: model work and block writes happen only inside :meth:`FillProgress.advance`,
on the calling (engine) thread; a fill dropped with :meth:`FillProgress.drop` is never
advanced again, so it never writes blocks vLLM may hand to another request once the
worker has named it; every fill added ends exactly once, finished or dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from kvshare.connector.metadata import LoadSpec

logger = logging.getLogger(__name__)


@dataclass
class FillOutcome:
    """What a fill wrote, in claimed prompt tokens."""

    loaded: int
    """Claimed tokens whose KV came from the tiers."""
    recomputed: int
    """Claimed tokens the fill computed."""
    load_seconds: float
    """Seconds spent fetching source chunks and re-rotating their keys (on the loader
    thread for a paged fill)."""


FillSteps = Generator["int | Future[object]", None, FillOutcome]
"""A fill as a resumable computation: it yields the token-layers of model work it just
did, or a future it waits for (chunk loads on a thread; it reads the result once
resumed), and returns its :class:`FillOutcome`."""

StartFill = Callable[[LoadSpec, set[str], bool], FillSteps]
"""``start(spec, missing, fallback)``: the fill of ``spec``, adding to ``missing`` the
source entries whose chunks could not be loaded; with ``fallback``, the claim recomputed
in full (exact, no loads)."""


@dataclass
class PendingFill:
    """One fill in flight."""

    spec: LoadSpec
    steps: FillSteps
    missing: set[str] = field(default_factory=set)
    fallback: bool = False
    """The selective fill failed; ``steps`` recomputes the claim in full."""
    compute_seconds: float = 0.0
    """Seconds this fill ran on the engine thread so far (never the wait for loads)."""
    waiting: Future[object] | None = None
    """The loads the fill waits for before it can go on."""


@dataclass
class FinishedFill:
    """A fill at its end: ``outcome`` is None when the full recompute failed too."""

    spec: LoadSpec
    outcome: FillOutcome | None
    fallback: bool
    missing: set[str]
    seconds: float
    """Engine-thread seconds plus the loads' seconds: the fill's whole cost."""


class FillProgress:
    """The fills in flight, in arrival order; see the module docstring."""

    def __init__(self, start: StartFill) -> None:
        self._start = start
        self._pending: list[PendingFill] = []
        self.last_step_work = 0
        """Token-layers of asynchronous fill work done in the latest :meth:`advance`."""

    @property
    def in_flight(self) -> list[str]:
        """Request ids of the fills in flight, oldest first."""
        return [fill.spec.req_id for fill in self._pending]

    def add(self, spec: LoadSpec) -> None:
        missing: set[str] = set()
        self._pending.append(PendingFill(spec, self._start(spec, missing, False), missing))

    def advance(self, budget: int | None) -> list[FinishedFill]:
        """Run every synchronous fill to its end, then asynchronous ones, oldest first, for
        up to ``budget`` token-layers of model work in all (whole layers; the first layer
        always runs), or all of them to their end when ``budget`` is None (a step that
        computes no request: nobody waits for the fills). Returns the fills that ended."""
        finished = [self._run(fill) for fill in self._pending
                    if budget is None or not fill.spec.load_async]
        work = 0
        for fill in [fill for fill in self._pending if fill.spec.load_async]:
            if budget is None or work >= budget:
                break
            work, done = self._advance(fill, budget, work)
            if done is not None:
                finished.append(done)
        self.last_step_work = work
        ended = {id(done.spec) for done in finished}
        self._pending = [fill for fill in self._pending if id(fill.spec) not in ended]
        return finished

    def drop(self, req_ids: Iterable[str]) -> set[str]:
        """Forget the fills of these requests (finished, aborted) without advancing them
        again; returns the ids whose fill was in flight."""
        req_ids = set(req_ids)
        dropped = [fill for fill in self._pending if fill.spec.req_id in req_ids]
        for fill in dropped:
            fill.steps.close()
        self._pending = [fill for fill in self._pending if fill.spec.req_id not in req_ids]
        return {fill.spec.req_id for fill in dropped}

    def _run(self, fill: PendingFill) -> FinishedFill:
        """A synchronous fill, to its end (waiting for its loads)."""
        done = None
        while done is None:
            if fill.waiting is not None:
                wait([fill.waiting])  # a failed load raises when the fill reads it
            _, done = self._advance(fill, None, 0)
        return done

    def _advance(self, fill: PendingFill, budget: int | None, work: int
                 ) -> tuple[int, FinishedFill | None]:
        """Advance one fill until ``work`` reaches ``budget`` (None: no limit) or the fill
        waits for its loads; returns the work done so far this step and the fill if it
        ended."""
        while budget is None or work < budget:
            if fill.waiting is not None:
                if not fill.waiting.done():
                    break
                fill.waiting = None
            started = time.perf_counter()
            try:
                step = next(fill.steps)
            except StopIteration as end:
                fill.compute_seconds += time.perf_counter() - started
                return work, self._finished(fill, end.value)
            except Exception:
                fill.compute_seconds += time.perf_counter() - started
                if fill.fallback:
                    logger.exception("kvshare: full recompute of %s failed; reporting its "
                                     "blocks as load errors", fill.spec.req_id)
                    return work, self._finished(fill, None)
                logger.exception("kvshare: selective fill of %s failed; recomputing the claim",
                                 fill.spec.req_id)
                fill.fallback = True
                fill.steps = self._start(fill.spec, fill.missing, True)
                continue
            fill.compute_seconds += time.perf_counter() - started
            if isinstance(step, Future):
                fill.waiting = step
                if budget is None:
                    break
                continue
            work += step
        return work, None

    @staticmethod
    def _finished(fill: PendingFill, outcome: FillOutcome | None) -> FinishedFill:
        seconds = fill.compute_seconds + (outcome.load_seconds if outcome else 0.0)
        return FinishedFill(fill.spec, outcome, fill.fallback, fill.missing, seconds)
