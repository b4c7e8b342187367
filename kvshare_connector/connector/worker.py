"""Worker-side half of the connector (runs in vLLM's worker process, owns the tiers).

Load (``start_load_kv``): for each claimed request, fetch the plan's source chunks (from
the tiers, or from the save queue while a source is still being written) on the loader
thread, re-rotate keys that moved, then run the selective-recompute engine, a few
layers per step while the request waits for its asynchronous load (or all at once, with
``fill_mode: sync``; see :mod:`kvshare.connector.fill_progress`), through
:class:`VLLMDecoderAdapter`, which attends with vLLM's own kernel over the request's
blocks and writes K/V with vLLM's own op. Tokens
whose chunks are missing, corrupt or mismatching join the recompute set. If the
selective path raises, the claim is recomputed in full (rho = 1: exact); if that raises
too, the claimed blocks are reported through ``get_block_ids_with_load_errors`` and
vLLM's ``kv_load_failure_policy`` decides (``recompute`` re-runs the prefill).

Save (``wait_for_save``, after the forward of the step that completes a prompt): a
background thread copies the prompt's K/V out of its blocks while vLLM samples and
returns the first token (the copy took 12-106 ms for 1,400 tokens, measured inside the
step, up to 8% of a prefill). ``begin_step``, the worker's first hook of the next step
and before any block is written again (vLLM zeroes newly allocated blocks before the
forward), waits for the copies and hands them to the write-behind
:class:`~kvshare.connector.save_queue.SaveQueue`; a later step reports the chunk keys the
tiers then hold, or that the prompt was not stored. Blocks stay put meanwhile: a running
request keeps them; vLLM holds those of a request that finished before its save was
answered until ``get_finished`` names it; a preempted one may lose them, so its copy is
discarded (``discarded_saves``).

Every load yields a :class:`LoadReport`, with ``fallback`` set when the selective fill
failed; source entries whose chunks were missing are reported so that the scheduler
drops them from the index. At start-up a background thread checks every durable index
entry against the tiers (a CPU tier starts empty; disk and Redis may have lost chunks)
and reports the entries whose chunks are gone the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from kvshare.config import KVShareConfig
from kvshare.connector.decode_correction import DecodeCorrector
from kvshare.connector.fill_progress import FillOutcome, FillProgress, FillSteps, FinishedFill
from kvshare.connector.metadata import (
    KVShareConnectorMetadata,
    KVShareWorkerMetadata,
    LoadReport,
    LoadSpec,
    SaveSpec,
    ShadowSpec,
)
from kvshare.connector.paged_kv import PagedKV
from kvshare.connector.save_queue import SaveJob, SaveQueue
from kvshare.connector.shadow import (
    COMPARED_POSITIONS,
    BeforeLayer,
    ShadowChecker,
    compare_next_tokens,
    forward_positions,
    reference_adapter,
)
from kvshare.connector.stats import KVShareConnectorStats
from kvshare.plugin import loaded_model
from kvshare.recompute.adapter import ModelAdapter
from kvshare.recompute.engine import MassBudget, PromptKV, SelectiveRecomputeEngine, run_to_end
from kvshare.recompute.hf_adapter import HFDecoderAdapter
from kvshare.recompute.rope import rerotate_keys
from kvshare.recompute.vllm_adapter import VLLMDecoderAdapter
from kvshare.storage.chunk import KVLayout
from kvshare.storage.commit import fetch_entry_chunks, lost_entries
from kvshare.tiers_setup import open_store

logger = logging.getLogger(__name__)


class KVShareWorker:
    """Loads and saves KV for the requests the scheduler side names each step."""

    def __init__(self, config: KVShareConfig, model_id: str, model_dir: Path) -> None:
        self.config = config
        self.model_id = model_id
        self.model_dir = model_dir
        """The served model's files, which shadow checks load their own copy from."""
        self.store = open_store(config)
        self.saves = SaveQueue(self.store, model_id, config.chunk_tokens,
                               config.save_queue_bytes)
        self.paged: PagedKV | None = None
        self.adapter: VLLMDecoderAdapter | None = None
        self.layout: KVLayout | None = None
        self._inv_freq: torch.Tensor | None = None
        """The model's RoPE frequencies (``rope_inv_freq``), for re-rotating loaded keys."""
        self._out = KVShareWorkerMetadata()
        self._load_errors: set[int] = set()
        self._stats = KVShareConnectorStats()
        """Loads since vLLM last asked for them (``get_kv_connector_stats``, every step)."""
        self._budget = (MassBudget(config.rho_mass, config.rho_min, config.rho_max)
                        if config.rho_mass > 0 else None)
        """The adaptive DHD budget, for fills whose request does not fix its rho."""
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="kvshare-save-copy")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvshare-fill-load")
        """Fills' chunk loads (tier reads, decompression, re-rotation: no model work)."""
        self.fills = FillProgress(self._start_fill)
        self._loads_done: set[str] = set()
        """Requests loaded asynchronously whose fill ended, for the next ``get_finished``."""
        self._copies: dict[str, tuple[SaveSpec, Future[torch.Tensor]]] = {}
        """Prompts being copied out of their blocks, from ``wait_for_save`` to the next
        ``begin_step``."""
        self._held: set[str] = set()
        """Finished requests whose blocks vLLM holds until their save is answered."""
        self._answered_before: set[str] = set()
        """Saves answered in the previous step: the scheduler may have held their requests
        before reading the answer, and says so in this step's metadata."""
        self._reconciled: set[str] = set()
        """Entries found without their chunks at start-up, not reported yet."""
        self._reconciled_lock = threading.Lock()
        self.shadow: ShadowChecker | None = None
        """Shadow checks of sampled fills (:mod:`kvshare.connector.shadow`), from
        ``register_kv_caches`` on."""
        self._reference: HFDecoderAdapter | None = None
        """The shadow checks' model (:func:`~kvshare.connector.shadow.reference_adapter`),
        loaded in ``register_kv_caches`` when checks are on, so that its memory is taken
        at start-up beside vLLM's rather than hours later; only the checker's thread uses
        it."""
        self.corrector: DecodeCorrector | None = None
        """Decode corrections (:mod:`kvshare.connector.decode_correction`), from
        ``register_kv_caches`` on."""

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        model = loaded_model()
        attn_layers = [layer.self_attn.attn for layer in model.model.layers]
        self.paged = PagedKV(attn_layers, kv_caches)
        self.adapter = VLLMDecoderAdapter(model, self.paged)
        self.layout = KVLayout(self.adapter.num_layers, self.adapter.num_kv_heads,
                               self.adapter.head_dim, self.adapter.dtype)
        self._inv_freq = self.adapter.rope_inv_freq
        self.shadow = ShadowChecker(self._shadow_check)
        if self.config.shadow_sample_rate > 0:
            self._reference_model()
        self.corrector = DecodeCorrector(self.config, model, self.paged)
        if self.config.mode == "embedded":  # the daemon checks its own index at start-up
            threading.Thread(target=self._reconcile, name="kvshare-reconcile",
                             daemon=True).start()

    def _reconcile(self) -> None:
        """Find the durable index entries whose chunks the tiers no longer hold."""
        missing = lost_entries(self.store, self.config.index_dir)
        with self._reconciled_lock:
            self._reconciled |= missing

    # ------------------------------------------------------------------ step
    def begin_step(self, meta: KVShareConnectorMetadata) -> None:
        """Before vLLM writes any block this step: finish the previous step's copies."""
        self._held |= meta.held_for_save
        copies, self._copies = self._copies, {}
        for req_id, (spec, copy) in copies.items():
            try:
                kv = copy.result()
            except Exception:
                logger.exception("kvshare: reading the prompt of %s failed", req_id)
                self._out.not_stored.add(req_id)
                continue
            if req_id in meta.discarded_saves:
                self._out.not_stored.add(req_id)  # preempted: its blocks may hold other KV
                continue
            try:
                self.saves.submit(SaveJob(req_id, kv, spec.token_ids, spec.scope,
                                          spec.entry_id, spec.exact_tokens))
            except Exception:
                logger.exception("kvshare: queueing the prompt of %s failed", req_id)
                self._out.not_stored.add(req_id)

    def get_finished(self, finished_req_ids: set[str]) -> set[str] | None:
        """Held requests whose save is answered (this step or the previous one): vLLM may
        free their blocks. Save results are collected here, once per step, so that every
        answer is reported in the same step's worker metadata."""
        self.corrector.forget(finished_req_ids)
        for result in self.saves.take_results():
            if result.chunk_keys is None:
                self._out.not_stored.add(result.req_id)
            else:
                self._out.stored[result.req_id] = result.chunk_keys
        answered = set(self._out.stored) | self._out.not_stored
        released = self._held & (answered | self._answered_before)
        self._held -= released
        self._answered_before = answered
        return released or None

    # ------------------------------------------------------------------ load
    @torch.inference_mode()
    def start_load_kv(self, meta: KVShareConnectorMetadata) -> None:
        self.corrector.forget(meta.corrections_dropped)
        # Fills: synchronous ones to their end, asynchronous ones by the step's budget in
        # all, or to their end in a step that computes no request
        # (kvshare.connector.fill_progress).
        for spec in meta.loads:
            self.fills.add(spec)
        for done in self.fills.advance(meta.fill_token_layers):
            self._fill_ended(done)
        for shadow in meta.shadows:
            self.shadow.submit(shadow)
        self._out.corrections += self.corrector.run(meta.corrections)

    def _fill_ended(self, done: FinishedFill) -> None:
        """Report a fill that ended. A request loaded asynchronously is named in
        ``get_finished`` now, also when its fill failed (its blocks are then load errors,
        which vLLM recomputes)."""
        spec = done.spec
        if spec.load_async:
            self._loads_done.add(spec.req_id)
        if done.outcome is None:
            self._load_errors.update(self._claimed_blocks(spec))
            self._stats.record_failure()
            return
        self._out.missing_entries |= done.missing
        report = LoadReport(
            req_id=spec.req_id, claimed=spec.num_claimed, loaded=done.outcome.loaded,
            recomputed=done.outcome.recomputed, fallback=done.fallback,
            seconds=done.seconds, load_seconds=done.outcome.load_seconds,
            sources=len(spec.sources))
        self._out.loads.append(report)
        self._stats.record(report)

    def finished_loads(self, finished_req_ids: set[str]) -> set[str] | None:
        """Requests loaded asynchronously whose fill ended since the last call, and those
        that finished (aborted) with their fill in flight: that fill is dropped before it
        writes again, and vLLM, which kept their blocks meanwhile, may free them."""
        done = self._loads_done | self.fills.drop(finished_req_ids)
        self._loads_done = set()
        return done or None

    def _start_fill(self, spec: LoadSpec, missing: set[str], fallback: bool) -> FillSteps:
        """The fill of ``spec`` as :class:`FillProgress` runs it: selective, or after a
        failure the claim recomputed in full (rho = 1: exact, nothing loaded)."""
        if fallback:
            return self._fill_steps(spec, 1.0, missing, load=False)
        return self._fill_steps(spec, spec.rho, missing,
                                budget=self._budget if spec.adaptive else None)

    def _fill_steps(self, spec: LoadSpec, rho: float, missing: set[str], load: bool = True,
                    budget: MassBudget | None = None) -> FillSteps:
        """Write K/V for positions ``[num_computed, end)`` into the request's blocks,
        recomputing ``rho`` of the reused tokens (or what ``budget`` decides), a layer at a
        time: vLLM's forward and other fills may use the adapter between two layers, so it
        is bound to this request's blocks again before each.

        Returns what it loaded and recomputed. Adds to ``missing`` the sources some of
        whose chunks could not be loaded."""
        adapter, paged = self.adapter, self.paged
        start, end = spec.num_computed, spec.end
        # Rows below ``start`` (vLLM's exact prefix hit) stay in the blocks, where the
        # adapter's attention reads them; the engine never tracks them. No row is read
        # before it is loaded or computed (rows below ``start`` never are), so the buffers
        # need no zeroing (measured: 4% of a fill).
        kv = PromptKV.empty(adapter, len(spec.token_ids) if self._probes else end,
                            zeroed=False)
        written: set[int] = set()

        def bind() -> None:
            adapter.bind(spec.block_ids, write_from=start)
            adapter.written_layers = written

        tracker = self.corrector.track(spec, kv, selective=load)
        filled = yield from self._selective_fill_steps(
            spec, adapter, kv, rho, missing, load, budget,
            before_layer=tracker and tracker.before_layer, rebind=bind)
        # Layers whose attention the engine skipped (the last one, or all after the
        # tracked set ran empty) still need their rows in the blocks.
        slots = paged.slots(spec.block_ids, start, end)
        for layer in sorted(set(range(adapter.num_layers)) - written):
            paged.write(layer, kv.keys[layer, start:end], kv.values[layer, start:end], slots)
        self.corrector.filled(spec.req_id)
        return filled

    @property
    def _probes(self) -> bool:
        """Whether the fill ranks by the tail's queries (the tail's rows are probes)."""
        return self.config.select_by != "deviation"

    def _selective_fill(self, spec: LoadSpec, adapter: ModelAdapter, kv: PromptKV, rho: float,
                        missing: set[str], load: bool = True, budget: MassBudget | None = None,
                        before_layer: BeforeLayer | None = None) -> FillOutcome:
        """All of :meth:`_selective_fill_steps` at once (shadow checks, on their thread)."""
        return run_to_end(self._selective_fill_steps(spec, adapter, kv, rho, missing, load,
                                                     budget, before_layer))

    def _selective_fill_steps(self, spec: LoadSpec, adapter: ModelAdapter, kv: PromptKV,
                              rho: float, missing: set[str], load: bool = True,
                              budget: MassBudget | None = None,
                              before_layer: BeforeLayer | None = None,
                              rebind: Callable[[], None] | None = None) -> FillSteps:
        """Load, re-rotate and selectively recompute positions ``[num_computed, end)`` of
        ``kv`` through ``adapter``: the fill itself, shared by the paged fill and shadow
        checks. ``kv`` has at least ``end`` rows; with probes, the whole prompt's. The
        loads run on the loader thread (they touch no model); the recompute yields after
        each layer, calling ``rebind`` (if any) before each."""
        start, end = spec.num_computed, spec.end
        # Rows past the claim are the tail vLLM computes; they serve only as probes.
        rows = kv if self._probes else PromptKV(kv.keys[:, :end], kv.values[:, :end])
        pending = torch.ones(end, dtype=torch.bool)
        pending[:start] = False
        load_seconds = 0.0
        if load:
            loads = self._loader.submit(self._timed_load_runs, spec, rows, pending, missing)
            yield loads
            load_seconds = loads.result()
        loaded = spec.num_claimed - int(pending.sum())
        verbatim_end = _verbatim_end(spec, pending)
        pending[spec.tail_start:] = True
        if verbatim_end == end:  # all copied verbatim: nothing to compute
            return FillOutcome(loaded, 0, load_seconds)
        engine = SelectiveRecomputeEngine(adapter, rho=rho, check_layers=self.config.check_layers,
                                          select_by=self.config.select_by, budget=budget)
        layers = engine.prefill_layers(spec.token_ids[:rows.num_tokens], rows,
                                       pending.nonzero().flatten(), exact_prefix=verbatim_end,
                                       logits=False, before_layer=before_layer,
                                       probe_from=end if self._probes else None)
        while True:
            if rebind is not None:
                rebind()
            try:
                work = next(layers)
            except StopIteration as done:
                result = done.value
                break
            yield work
        return FillOutcome(loaded, int(result.tracked.numel()), load_seconds)

    def _shadow_check(self, spec: ShadowSpec, before_layer: BeforeLayer
                      ) -> tuple[float, float, int]:
        """Full compute vs this fill, densely, on the checks' own model (see
        :mod:`kvshare.connector.shadow`); runs on the checker's thread. The first check
        loads that model, and its duration includes the load."""
        fill, adapter = spec.fill, self._reference_model()
        start, end, num_tokens = fill.num_computed, fill.end, len(fill.token_ids)
        compared = min(COMPARED_POSITIONS, num_tokens - end)
        reference = PromptKV.empty(adapter, num_tokens, zeroed=False)
        full_logits = forward_positions(adapter, fill.token_ids, reference, 0, compared,
                                        before_layer)
        kv = PromptKV.empty(adapter, num_tokens, zeroed=False)
        kv.keys[:, :start] = reference.keys[:, :start]  # vLLM's exact prefix hit
        kv.values[:, :start] = reference.values[:, :start]
        self._selective_fill(fill, adapter, kv, fill.rho, set(),
                             budget=self._budget if fill.adaptive else None,
                             before_layer=before_layer)
        fill_logits = forward_positions(adapter, fill.token_ids, kv, end, compared, before_layer)
        return (*compare_next_tokens(full_logits, fill_logits), compared)

    def _reference_model(self) -> HFDecoderAdapter:
        if self._reference is None:
            started = time.perf_counter()
            self._reference = reference_adapter(self.model_dir, self.adapter.dtype)
            logger.info("kvshare: shadow checks loaded their copy of the model from %s in "
                        "%.1f s", self.model_dir, time.perf_counter() - started)
        return self._reference

    def _timed_load_runs(self, spec: LoadSpec, kv: PromptKV, pending: torch.Tensor,
                         missing: set[str]) -> float:
        """:meth:`_load_runs` on the loader thread; returns its seconds."""
        started = time.perf_counter()
        with torch.inference_mode():
            self._load_runs(spec, kv, pending, missing)
        return time.perf_counter() - started

    def _load_runs(self, spec: LoadSpec, kv: PromptKV, pending: torch.Tensor,
                   missing: set[str]) -> None:
        """Copy each run's verified source rows into ``kv``, keys moved to their new place.

        Rows go from each chunk straight to their destination, a chunk's part at a time:
        assembling whole source entries first meant allocations above glibc's mmap
        threshold (32 MiB), whose page faults cost more than the copies themselves.
        """
        runs_by_entry = defaultdict(list)
        for run in spec.runs:
            runs_by_entry[run.entry_id].append(run)
        inv_freq = self._inv_freq
        ct = self.config.chunk_tokens
        for entry_id, runs in runs_by_entry.items():
            source = spec.sources[entry_id]
            touched_by = [(run, range(run.src_start // ct,
                                      (run.src_start + run.length - 1) // ct + 1))
                          for run in runs]
            held = fetch_entry_chunks(
                self.saves, [bytes.fromhex(k) for k in source.chunk_keys], source.token_ids,
                ct, self.layout, chunks={i for _, touched in touched_by for i in touched},
                model_id=self.model_id)
            for run, touched in touched_by:
                delta = run.dst_start - run.src_start
                for index in touched:
                    chunk = held.get(index)
                    if chunk is None:
                        missing.add(entry_id)
                        continue  # lost or unverified: these positions stay pending
                    lo = max(run.src_start, index * ct)
                    hi = min(run.src_start + run.length, index * ct + chunk.kv.shape[2])
                    part = chunk.kv[:, :, lo - index * ct:hi - index * ct]
                    dst = slice(lo + delta, hi + delta)
                    keys = part[:, 0]
                    kv.keys[:, dst] = rerotate_keys(keys, delta, inv_freq) if delta else keys
                    kv.values[:, dst] = part[:, 1]
                    pending[dst] = False

    def _claimed_blocks(self, spec: LoadSpec) -> set[int]:
        bs = self.paged.block_size
        return set(spec.block_ids[spec.num_computed // bs:(spec.end - 1) // bs + 1])

    def get_kv_connector_stats(self) -> KVShareConnectorStats | None:
        """The loads since the last call, for vLLM's stat loggers; None when there were
        none (vLLM counts any stats object as output). vLLM calls it after every step, on
        the thread that runs ``start_load_kv``."""
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, KVShareConnectorStats()
        return stats

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ------------------------------------------------------------------ save
    def wait_for_save(self, meta: KVShareConnectorMetadata) -> None:
        for spec in meta.saves:
            self._copies[spec.req_id] = (spec, self._copier.submit(self._read_prompt, spec))

    @torch.inference_mode()
    def _read_prompt(self, spec: SaveSpec) -> torch.Tensor:
        """A private copy of the prompt's K/V, ``[num_layers, 2, num_tokens, heads, dim]``."""
        num_tokens = len(spec.token_ids)
        slots = self.paged.slots(spec.block_ids, 0, num_tokens)
        kv = torch.empty(self.layout.shape(num_tokens), dtype=self.layout.dtype)
        for layer in range(self.layout.num_layers):
            kv[layer, 0], kv[layer, 1] = self.paged.read(layer, slots)
        return kv

    def build_connector_worker_meta(self) -> KVShareWorkerMetadata | None:
        with self._reconciled_lock:
            self._out.missing_entries |= self._reconciled
            self._reconciled = set()
        out, self._out = self._out, KVShareWorkerMetadata()
        if self.shadow is not None:
            out.shadows = self.shadow.take_results()
        return out if (out.stored or out.not_stored or out.loads or out.missing_entries
                       or out.shadows or out.corrections) else None

    def shutdown(self) -> None:
        if self.shadow is not None:
            self.shadow.close()
        self._copier.shutdown(wait=True)
        self._loader.shutdown(wait=True)
        self.saves.close()
        self.store.close()


def _verbatim_end(spec: LoadSpec, pending: torch.Tensor) -> int:
    """One past the rows the fill treats as the prompt's own, like vLLM's prefix hit:
    vLLM's hit, then the claim's verbatim rows up to the first one that did not load (its
    chunk was missing) or the recomputed tail. The engine attends to them but never ranks
    or recomputes them: recomputing exact rows only changes their last bits."""
    start, stop = spec.num_computed, min(max(spec.verbatim_end, spec.num_computed),
                                         spec.tail_start)
    not_loaded = pending[start:stop].nonzero()
    return start + int(not_loaded[0]) if not_loaded.numel() else stop
