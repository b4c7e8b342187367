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
the mean KL(reference || fill) in nats. Both sides run on one reference model
(:func:`reference_adapter`), so they differ only by the fill.

The reference model is transformers' copy of the served model, not vLLM's modules. vLLM's
modules are not safe to call beside the engine's forward: on CPU each linear layer runs
oneDNN through one handler whose primitive cache is filled per batch size, and calls from a
second thread corrupted the heap (``malloc_consolidate(): invalid chunk size``) or
returned non-finite logits. Nor can a check compute with torch from vLLM's weights: on CPU
vLLM reorders every linear layer's weight into oneDNN's packed layout and replaces
``layer.weight`` by an empty tensor (``dispatch_cpu_unquantized_gemm(remove_weight=True)``),
so no plain ``[out, in]`` weight is left to read. A check therefore owns its model,
loaded from the served model's directory at the worker's start-up (when checks are on): one
more copy of the weights in the worker's memory, their size in the model's dtype (about
270 MB for SmolLM2-135M in bf16, 14 GB for a 7B model). Its numerics are transformers'
(torch SDPA, the residual added in the model dtype), which differ from vLLM's prefill by
bf16 rounding; both sides of a check share them.

A check computes its prompt about 1.3 times over (full compute, then the fill and the
positions after the claim); on CPU, on transformers' modules, a check of a 1,024-token
SmolLM2 prompt took 1.3-1.5 s where vLLM prefilled it in 0.92 s. It never delays the
request it samples:
the request's own fill and forward run as always, and :class:`ShadowChecker` runs checks
one at a time on a thread of the lowest CPU priority (nice 19; the OpenMP workers it
starts inherit it), beside engine steps: on a core an engine at nice 0 keeps busy, a
check gets about 1.5% of the time (Linux's weights for nice 19 and 0), and it takes the
time the engine leaves idle. A check shares with the engine only data it reads (the
request's token ids, the RoPE frequencies) and the save queue and tiers it loads chunks
from, which are thread-safe. At most ``QUEUE_SIZE`` checks wait; further ones are dropped
(and answered as dropped).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kvshare.connector.metadata import ShadowResult, ShadowSpec
from kvshare.recompute.adapter import ModelAdapter
from kvshare.recompute.engine import PromptKV
from kvshare.recompute.hf_adapter import HFDecoderAdapter

logger = logging.getLogger(__name__)

COMPARED_POSITIONS = 32
"""Prompt positions compared, the last ones (fewer when fewer follow the claim)."""
QUEUE_SIZE = 2
"""Checks waiting behind the running one; a check submitted beyond them is dropped."""
LOW_PRIORITY = 19
"""The checker thread's nice value: the lowest CPU priority."""

BeforeLayer = Callable[[int], None]
"""Called before each layer of a check (with its index); raises once the checker closes,
so that closing never waits for a whole check."""
CheckFn = Callable[[ShadowSpec, BeforeLayer], tuple[float, float, int]]
"""Runs one check: (top-1 agreement share, mean KL in nats, positions compared)."""


def reference_adapter(model_dir: Path, dtype: torch.dtype) -> HFDecoderAdapter:
    """The checks' own copy of the served model, as transformers loads ``model_dir``, in
    vLLM's ``dtype`` (see the module docstring for why, and what it costs)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return HFDecoderAdapter(model.eval().requires_grad_(False))


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
                      first: int, num_logits: int, before_layer: BeforeLayer) -> torch.Tensor:
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
        before_layer(layer)
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
    """Runs shadow checks one at a time on a low-priority thread, beside engine steps.

    Every submitted spec gets exactly one :class:`ShadowResult` from :meth:`take_results`
    (until :meth:`close`).
    """

    def __init__(self, check: CheckFn, queue_size: int = QUEUE_SIZE) -> None:
        self._check = check
        self._queue: queue.Queue[ShadowSpec | None] = queue.Queue(queue_size)
        self._results: list[ShadowResult] = []
        self._results_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvshare-shadow", daemon=True)
        self._thread.start()

    def submit(self, spec: ShadowSpec) -> None:
        """Queue a check, or answer it as dropped when the checker is busy. Never blocks."""
        try:
            self._queue.put_nowait(spec)
        except queue.Full:
            self._answer(_result(spec, "dropped"))

    def take_results(self) -> list[ShadowResult]:
        """Results answered since the last call."""
        with self._results_lock:
            results, self._results = self._results, []
        return results

    def drain(self) -> None:
        """Return once every check queued so far has been answered (tools and tests)."""
        self._queue.join()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread: a running check ends at its next layer, queued ones are not run
        (nor answered). Waits up to ``timeout_s`` for the thread to end."""
        self._closed = True
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the thread sees ``_closed`` after its running check
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        # Threads the checker starts (its OpenMP workers) inherit this priority.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY)
        except (AttributeError, OSError):
            logger.warning("kvshare: could not lower the shadow checker's CPU priority; "
                           "checks compete with the engine for the CPU")
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
                top1, kl, positions = self._check(spec, self._before_layer)
        except _Closed:
            raise
        except Exception:
            logger.exception("kvshare: shadow check of %s failed", spec.fill.req_id)
            return _result(spec, "error")
        return _result(spec, "done", top1=top1, kl=kl, positions=positions,
                       seconds=time.perf_counter() - started)

    def _before_layer(self, layer: int) -> None:
        if self._closed:
            raise _Closed

    def _answer(self, result: ShadowResult) -> None:
        with self._results_lock:
            self._results.append(result)


def _result(spec: ShadowSpec, outcome: str, **numbers: float) -> ShadowResult:
    return ShadowResult(req_id=spec.fill.req_id, scope=spec.scope, withheld=spec.withheld,
                        outcome=outcome, **numbers)
