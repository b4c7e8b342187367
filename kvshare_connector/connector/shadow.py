"""Shadow checks: a sample of fills, redone beside full compute and compared, off the request path.

A check takes a :class:`~kvshare.connector.metadata.ShadowSpec` (a request's load plan,
without blocks) and computes densely, never touching vLLM's paged cache:

1. full compute of the whole prompt (the reference);
2. kvshare's fill of the claim through the worker's own loading, re-rotation and
   selective-recompute code (so a fault there shows up here too), rows below the claim
   (vLLM's exact prefix hit) taken from the reference, then the forward of the positions
   after the claim over it, as vLLM computes them after a real fill;

and compares the next-token distributions at the prompt's last ``COMPARED_POSITIONS``
positions after the claim: the share of positions whose most likely token agrees, and
the mean KL(reference || fill) in nats. Both sides run on the same
:class:`~kvshare.recompute.vllm_adapter.DenseVLLMDecoderAdapter`, so they differ only
by the fill.

A check costs about 1.3 prefills of its prompt. It never delays the request it samples:
the request's own fill and forward run as always, and :class:`ShadowChecker` runs checks
one at a time on a thread of the lowest CPU priority, between engine steps; at most
``QUEUE_SIZE`` checks wait, further ones are dropped (and answered as dropped).

Between steps, not during them: vLLM's modules are not safe to call from two threads at
once. On CPU its linear layers run oneDNN through one handler per layer whose primitive
cache is filled per batch size; calling them beside the engine's forward corrupted the
heap (``malloc_consolidate(): invalid chunk size``) and returned NaN logits. So every
call of a model module by a check holds :meth:`ShadowChecker.model_turn`, which waits
until no step runs, and a step (:meth:`ShadowChecker.step_started`) waits for the check's
module call in progress, if any: at most one call, never a whole check or layer.

Open problem (why ``shadow_sample_rate`` defaults to 0): on the test engine
(``max_num_batched_tokens=256``, prompts of about 600 tokens) every check's full compute
returned non-finite logits, on a larger-budget engine rarely; such a check is answered
as ``error`` and never counts against a scope.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from kvshare.connector.metadata import ShadowResult, ShadowSpec
from kvshare.recompute.adapter import ModelAdapter
from kvshare.recompute.engine import PromptKV

logger = logging.getLogger(__name__)

COMPARED_POSITIONS = 32
"""Prompt positions compared, the last ones (fewer when fewer follow the claim)."""
QUEUE_SIZE = 2
"""Checks waiting behind the running one; a check submitted beyond them is dropped."""
LOW_PRIORITY = 19
"""The checker thread's nice value: the lowest CPU priority."""

Pause = Callable[[int], None]
"""Called before each layer of a check (with its index); returns when the check may go on."""
CheckFn = Callable[[ShadowSpec, Pause], tuple[float, float, int]]
"""Runs one check: (top-1 agreement share, mean KL in nats, positions compared)."""


def compare_next_tokens(reference: torch.Tensor, system: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement share and mean KL(reference || system) in nats of ``[n, vocab]``
    logits, position by position, over the whole vocabulary. Non-finite logits raise: a
    numerical failure of the check is no evidence about the fill."""
    for name, logits in (("reference", reference), ("system", system)):
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"the {name} logits are not finite")
    ref = reference.float().log_softmax(-1)
    sys = system.float().log_softmax(-1)
    kl = (ref.exp() * (ref - sys)).sum(-1).clamp_min(0.0)
    top1 = (ref.argmax(-1) == sys.argmax(-1)).float()
    return float(top1.mean()), float(kl.mean())


def forward_positions(adapter: ModelAdapter, token_ids: Sequence[int], kv: PromptKV,
                      first: int, num_logits: int, pause: Pause) -> torch.Tensor:
    """Compute positions ``[first, T)`` over ``kv`` and return the logits ``[num_logits,
    vocab]`` of the last ``num_logits`` of them.

    Rows below ``first`` must hold K/V; the positions' own rows are written at every
    layer (a plain prefill of them, attending to everything before them).
    """
    num_tokens = kv.num_tokens
    positions = torch.arange(first, num_tokens, device=adapter.device)
    tokens = torch.as_tensor(list(token_ids[first:num_tokens]), dtype=torch.int64,
                             device=adapter.device)
    update, residual = adapter.embed(tokens), None
    for layer in range(adapter.num_layers):
        pause(layer)
        x, residual = adapter.input_norm(layer, update, residual)
        q, k, v = adapter.qkv(layer, x)
        q, k = adapter.rope(q, k, positions)
        kv.keys[layer, first:] = k
        kv.values[layer, first:] = v
        attn = adapter.attention(layer, q, positions, kv.keys[layer], kv.values[layer])
        x, residual = adapter.post_attention_norm(layer, adapter.o_proj(layer, attn), residual)
        update = adapter.mlp(layer, x)
    return adapter.logits(update[-num_logits:], residual[-num_logits:]).float()


class _Closed(Exception):
    """The checker is closing: the running check stops at its next layer."""


class ShadowChecker:
    """Runs shadow checks one at a time on a low-priority thread, between engine steps.

    The worker calls :meth:`step_started` and :meth:`step_ended` around every engine
    step; a check waits at its next layer while a step runs. Every submitted spec gets
    exactly one :class:`ShadowResult` from :meth:`take_results`.
    """

    def __init__(self, check: CheckFn, queue_size: int = QUEUE_SIZE,
                 num_threads: int | None = None) -> None:
        self._check = check
        self._num_threads = num_threads or torch.get_num_threads()
        """The engine thread's intra-op thread count (see :meth:`_run`)."""
        self._queue: queue.Queue[ShadowSpec | None] = queue.Queue(queue_size)
        self._results: list[ShadowResult] = []
        self._results_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._model_lock = threading.Lock()
        """Held by an engine step from start to end, and by a check around each call of
        a model module."""
        self._in_step = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvshare-shadow", daemon=True)
        self._thread.start()

    def submit(self, spec: ShadowSpec) -> None:
        """Queue a check, or answer it as dropped when the checker is busy. Never blocks."""
        try:
            self._queue.put_nowait(spec)
        except queue.Full:
            self._answer(_result(spec, "dropped"))

    def step_started(self) -> None:
        """An engine step begins: checks make no new module call until it ends (the one in
        progress, if any, finishes first)."""
        if self._in_step:
            return
        self._idle.clear()  # before the lock: the check must not take it again meanwhile
        self._model_lock.acquire()
        self._in_step = True

    def step_ended(self) -> None:
        if not self._in_step:
            return
        self._in_step = False
        self._model_lock.release()
        self._idle.set()

    @contextmanager
    def model_turn(self) -> Iterator[None]:
        """Hold around each call of a model module by a check (see the module docstring)."""
        while True:
            self._pause(-1)
            self._model_lock.acquire()
            if self._idle.is_set():
                break
            self._model_lock.release()  # a step began between the wait and the lock
        try:
            yield
        finally:
            self._model_lock.release()

    def take_results(self) -> list[ShadowResult]:
        """Results answered since the last call."""
        with self._results_lock:
            results, self._results = self._results, []
        return results

    def drain(self) -> None:
        """Return once every check queued so far has been answered (tools and tests)."""
        self._queue.join()

    def close(self) -> None:
        """Stop the thread: a running check ends at its next layer, queued ones are not run."""
        self._closed = True
        self._idle.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the thread sees ``_closed`` after its running check
        self._thread.join(timeout=10.0)

    def _run(self) -> None:
        # A new thread's OpenMP team defaults to every CPU, but vLLM's CPU kernels size
        # per-thread scratch buffers for the engine thread's team: a larger team wrote
        # past them (heap corruption, NaN logits). Use the engine's count.
        torch.set_num_threads(self._num_threads)
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY)
        except (AttributeError, OSError):
            logger.warning("kvshare: could not lower the shadow checker's CPU priority; "
                           "checks compete with the engine between steps")
        while True:
            spec = self._queue.get()
            try:
                if spec is None or self._closed:
                    return
                self._answer(self._run_one(spec))
            except _Closed:
                return
            finally:
                self._queue.task_done()

    def _run_one(self, spec: ShadowSpec) -> ShadowResult:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                top1, kl, positions = self._check(spec, self._pause)
        except _Closed:
            raise
        except Exception:
            logger.exception("kvshare: shadow check of %s failed", spec.fill.req_id)
            return _result(spec, "error")
        return _result(spec, "done", top1=top1, kl=kl, positions=positions,
                       seconds=time.perf_counter() - started)

    def _pause(self, layer: int) -> None:
        self._idle.wait()
        if self._closed:
            raise _Closed

    def _answer(self, result: ShadowResult) -> None:
        with self._results_lock:
            self._results.append(result)


def _result(spec: ShadowSpec, outcome: str, **numbers: float) -> ShadowResult:
    return ShadowResult(req_id=spec.fill.req_id, scope=spec.scope, withheld=spec.withheld,
                        outcome=outcome, **numbers)
