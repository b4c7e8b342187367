"""Decode correction: recompute, once while a reused request decodes, the reused tokens
that its answer reads and that deviate most.

DHD picks the reused tokens to recompute at prefill by their K/V deviation at the check
layer. While the answer is generated, attention moves: ``kvshare bench decode-drift``
(docs/decode-drift.md) measured that a third more of the prompt's attention falls on
reused, not recomputed ("approx") tokens, and that recomputing 15% of the reused tokens
ranked by *deviation x the first generated token's attention averaged over all layers*
removes 55% of the later KL in simulation (layer-1 attention alone: 13%). This module
runs that design on vLLM; docs/decode-correction.md says why and what it measured.

Two halves, like the connector:

* :class:`CorrectionPlanner` (scheduler side) arms a request once its fill's load report
  says it reused tokens, and sends a :class:`~kvshare.connector.metadata.CorrectionSpec`
  in the step whose forward reads generated token ``decode_correction_step`` (the
  scheduler knows that token: vLLM CPU schedules synchronously). It names the blocks the
  correction may change: those vLLM's block pool counts one holder for (``ref_cnt == 1``),
  never blocks its prefix cache shares with another running request. Preemption drops
  the correction (a resumed request that kvshare fills again is armed by that fill; one
  that vLLM's prefix cache restores decodes over its fill's KV as it was); finish and
  abort drop everything. The count of corrected tokens joins the load report (``corrected``).
* :class:`DecodeCorrector` (worker side, on the engine thread in ``start_load_kv``, like
  the fill: vLLM's modules are not thread-safe and on CPU its linear weights exist only
  in oneDNN's packed form) keeps, per filled request, the approx positions and their
  deviation (:class:`FillTracker` watches the fill through the engine's ``before_layer``
  hook), then per spec: a one-token forward of the new token through the vLLM adapter
  against the paged KV (its per-layer queries and attention, nothing written), the score,
  and a selective recompute of the top tokens through every layer
  (:class:`~kvshare.recompute.engine.SelectiveRecomputeEngine`, no check layer), whose
  rows overwrite theirs in the paged cache with vLLM's own write op. vLLM's forward of
  the new token then attends to the corrected rows. No hook goes into vLLM's compiled
  model: everything runs between steps on vLLM's own modules, eagerly.

Invariants: only approx positions of the request's own fill in writable blocks are ever
written; a request is corrected at most once per fill; the per-step budget
(``decode_correction_max_tokens_per_step``) bounds the tokens recomputed per step, and a
request past it waits for a later step; a failing correction changes nothing it has not
finished writing, is logged once and reported as 0 corrected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvshare.config import KVShareConfig
from kvshare.connector.metadata import CorrectionReport, CorrectionSpec, LoadReport, LoadSpec
from kvshare.connector.paged_kv import slots_of
from kvshare.recompute.engine import PromptKV, SelectiveRecomputeEngine
from kvshare.recompute.vllm_adapter import VLLMDecoderAdapter

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from kvshare.connector.paged_kv import PagedKV

logger = logging.getLogger(__name__)

CORRECTION_ARG = "kvshare_decode_correction"
"""``SamplingParams.extra_args`` key (``vllm_xargs`` over HTTP): 1 or 0 turns the decode
correction on or off for this request, whatever ``decode_correction`` says."""
LATE_REPORT_UPDATES = 2
"""Output updates a finished request's correction report may arrive after it finished."""


def correction_wanted(request: Request, config: KVShareConfig) -> bool:
    """The request's ``CORRECTION_ARG``, else the config's ``decode_correction``."""
    extra = request.sampling_params.extra_args if request.sampling_params else None
    value = (extra or {}).get(CORRECTION_ARG)
    if value is None:
        return config.decode_correction
    return str(value).lower() not in ("0", "false", "no")


# ---------------------------------------------------------------------- scheduler side
@dataclass
class _Armed:
    request: Request
    sent: bool = False
    """A spec is out; its report has not come back."""


class CorrectionPlanner:
    """Which requests to correct in which step, and with which blocks (scheduler side)."""

    def __init__(self, config: KVShareConfig) -> None:
        self.config = config
        self.kv_cache_manager: KVCacheManager | None = None
        """vLLM's, bound by the connector (``bind_kv_cache_manager``): block ids and their
        ref counts. Without it nothing is corrected (shared blocks could not be told)."""
        self._armed: dict[str, _Armed] = {}
        self._corrected: dict[str, int] = {}
        """Requests whose fill asked for a correction -> tokens corrected so far."""
        self._late: dict[str, tuple[int, dict[str, Any]]] = {}
        self._updates = 0

    def on_load_report(self, request: Request, report: LoadReport, wanted: bool) -> None:
        """A fill's report: arm the request when its fill reused tokens."""
        if not wanted:
            return
        self._corrected.setdefault(report.req_id, 0)
        if report.reused > 0 and not report.fallback:
            self._armed[report.req_id] = _Armed(request)

    def plan(self, scheduler_output: SchedulerOutput) -> tuple[list[CorrectionSpec], set[str]]:
        """This step's corrections, and the preempted requests whose records to drop."""
        preempted = set(scheduler_output.preempted_req_ids or ())
        cached = scheduler_output.scheduled_cached_reqs
        preempted |= set(cached.resumed_req_ids)
        dropped = {req_id for req_id in preempted if self._armed.pop(req_id, None)}
        for req_id in sorted(dropped):
            logger.info("kvshare: %s was preempted before its decode correction; dropped "
                        "(a refill after it resumes arms a new one)", req_id)
        if not self._armed or self.kv_cache_manager is None:
            return [], dropped
        specs = []
        for i, req_id in enumerate(cached.req_ids):
            armed = self._armed.get(req_id)
            if armed is None or armed.sent:
                continue
            request, position = armed.request, cached.num_computed_tokens[i]
            due = request.num_prompt_tokens + self.config.decode_correction_step - 1
            if scheduler_output.num_scheduled_tokens[req_id] != 1 or position < due:
                continue  # not a decode step yet (a resumed request's prefill, say)
            block_ids = list(self.kv_cache_manager.get_block_ids(req_id)[0])
            blocks = self.kv_cache_manager.block_pool.blocks
            writable = [b for b in block_ids
                        if self.config.strict_prefix_cache or blocks[b].ref_cnt == 1]
            specs.append(CorrectionSpec(req_id, int(request.all_token_ids[position]),
                                        position, block_ids, writable))
            armed.sent = True
        return specs, dropped

    def take(self, reports: list[CorrectionReport]) -> None:
        """The worker's answers: count what was done, re-arm what was deferred."""
        self._updates += 1
        for report in reports:
            armed = self._armed.get(report.req_id)
            if report.deferred and armed is not None:
                armed.sent = False
                continue
            self._armed.pop(report.req_id, None)
            if report.req_id in self._corrected:
                self._corrected[report.req_id] += report.corrected
            late = self._late.pop(report.req_id, None)
            if late is not None:
                late[1]["corrected"] = late[1].get("corrected", 0) + report.corrected
        for req_id, (update, _) in list(self._late.items()):
            if self._updates - update >= LATE_REPORT_UPDATES:
                del self._late[req_id]

    def finished(self, req_id: str, report: dict[str, Any]) -> None:
        """Forget the request; put ``corrected`` into its load report when it asked for a
        correction (filled in later when that correction's report is still on its way)."""
        armed = self._armed.pop(req_id, None)
        corrected = self._corrected.pop(req_id, None)
        if corrected is None:
            return
        report["corrected"] = corrected
        if armed is not None and armed.sent:
            self._late[req_id] = (self._updates, report)

    def holds(self) -> bool:
        """Whether any per-request state is left (tests: none once requests are done)."""
        return bool(self._armed or self._corrected or self._late)


# ---------------------------------------------------------------------- worker side
@dataclass
class FillRecord:
    """What a correction needs from one request's fill."""

    token_ids: list[int]
    """The prompt up to the claim's end."""
    start: int
    """vLLM's prefix hit: rows below are exact and never corrected."""
    candidates: torch.Tensor
    """int64, sorted: approx positions (loaded and not recomputed by the fill)."""
    deviation: torch.Tensor
    """float32, one per candidate: DHD's deviation at the first check layer (1 where the
    config has no check layer)."""
    num_reused: int
    """Loaded positions of the claim outside the fill's initial recompute set and its
    verbatim rows: DHD's base
    for ``rho``, and the correction's base for ``decode_correction_share``."""


@dataclass
class FillTracker:
    """Watches one fill through the engine's ``before_layer`` hook: the loaded rows of the
    check layer (for the deviation) and of the last layer (what stays loaded there was
    not recomputed), compared with the rows the fill leaves."""

    spec: LoadSpec
    kv: PromptKV
    check_layer: int | None
    last_layer: int
    _loaded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def before_layer(self, layer: int) -> None:
        if layer in (self.check_layer, self.last_layer):
            rows = slice(self.spec.num_computed, self.spec.end)
            self._loaded[layer] = (self.kv.keys[layer, rows].clone(),
                                   self.kv.values[layer, rows].clone())

    def record(self) -> FillRecord:
        spec, rows = self.spec, slice(self.spec.num_computed, self.spec.end)
        covered = torch.zeros(spec.end, dtype=torch.bool)
        for run in spec.runs:
            covered[run.dst_start:run.dst_start + run.length] = True
        covered[:max(spec.num_computed, spec.verbatim_end)] = False  # exact rows
        covered[spec.tail_start:] = False
        kept = torch.zeros(spec.end, dtype=torch.bool)
        if self.last_layer in self._loaded:
            keys, values = self._loaded[self.last_layer]
            same = ((self.kv.keys[self.last_layer, rows] == keys).flatten(1).all(1)
                    & (self.kv.values[self.last_layer, rows] == values).flatten(1).all(1))
            kept[rows] = same
        else:  # the fill stopped early: nothing was tracked to the last layer
            kept[rows] = True
        candidates = (covered & kept).nonzero().flatten()
        deviation = torch.ones(candidates.numel())
        if self.check_layer in self._loaded:
            keys, values = self._loaded[self.check_layer]
            at = candidates - spec.num_computed
            fresh = self.kv.keys[self.check_layer, candidates]
            deviation = (fresh - keys[at]).float().flatten(1).norm(dim=1)
            deviation += (self.kv.values[self.check_layer, candidates]
                          - values[at]).float().flatten(1).norm(dim=1)
        return FillRecord(list(spec.token_ids[:spec.end]), spec.num_computed, candidates,
                          deviation, int(covered.sum()))


class _PickedRowsAdapter(VLLMDecoderAdapter):
    """The vLLM adapter writing only the queried positions' rows: a correction's tracked
    tokens are the only rows it may change (the others stay as the paged cache holds
    them, and attention reads them there)."""

    def attention(self, layer, q, q_positions, keys, values):
        slots = slots_of(self._block_ids, q_positions, self._paged.block_size)
        self._paged.write(layer, keys[q_positions], values[q_positions], slots)
        self.written_layers.add(layer)
        return self._paged_attention(layer, q, q_positions)


class DecodeCorrector:
    """Records fills and runs corrections (worker side; engine thread only)."""

    def __init__(self, config: KVShareConfig, model: torch.nn.Module, paged: PagedKV) -> None:
        self.config = config
        self.paged = paged
        self.adapter = _PickedRowsAdapter(model, paged)
        self.records: dict[str, FillRecord] = {}
        self._trackers: dict[str, FillTracker] = {}

    # ---- fills
    def track(self, spec: LoadSpec, kv: PromptKV, selective: bool) -> FillTracker | None:
        """A tracker for a fill of ``spec`` into ``kv`` (None: a full recompute, which
        leaves nothing to correct, or no correction wanted). Whatever an earlier fill of
        the request left is dropped."""
        self.forget({spec.req_id})
        if not (selective and spec.decode_correction):
            return None
        check = self.config.check_layers[0] if self.config.check_layers else None
        tracker = FillTracker(spec, kv, check, self.adapter.num_layers - 1)
        self._trackers[spec.req_id] = tracker
        return tracker

    def filled(self, req_id: str) -> None:
        """The fill tracked for ``req_id`` completed: keep its record if it has candidates."""
        tracker = self._trackers.pop(req_id, None)
        if tracker is None:
            return
        record = tracker.record()
        if record.candidates.numel():
            self.records[req_id] = record

    def forget(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            self.records.pop(req_id, None)
            self._trackers.pop(req_id, None)

    # ---- corrections
    @torch.inference_mode()
    def run(self, specs: list[CorrectionSpec]) -> list[CorrectionReport]:
        """Run this step's corrections in order, within the step's token budget."""
        reports, budget = [], self.config.decode_correction_max_tokens_per_step
        for spec in specs:
            started = time.perf_counter()
            record = self.records.get(spec.req_id)
            if record is None:
                reports.append(CorrectionReport(spec.req_id, 0))
                continue
            wanted = max(1, round(self.config.decode_correction_share * record.num_reused))
            if budget <= 0:
                reports.append(CorrectionReport(spec.req_id, 0, deferred=True))
                continue
            del self.records[spec.req_id]  # once per fill, also when it fails
            try:
                corrected = self._correct(spec, record, min(wanted, budget))
            except Exception as error:  # one line: the request is served all the same
                logger.warning("kvshare: decode correction of %s failed (%s: %s); its KV "
                               "stays as the fill left it", spec.req_id,
                               type(error).__name__, error)
                corrected = 0
            budget -= corrected
            reports.append(CorrectionReport(spec.req_id, corrected,
                                            seconds=time.perf_counter() - started))
        return reports

    def _correct(self, spec: CorrectionSpec, record: FillRecord, limit: int) -> int:
        bs = self.paged.block_size
        writable = torch.as_tensor(spec.writable_blocks, dtype=torch.int64)
        blocks = torch.as_tensor(spec.block_ids, dtype=torch.int64)[record.candidates // bs]
        allowed = torch.isin(blocks, writable)
        candidates, deviation = record.candidates[allowed], record.deviation[allowed]
        if candidates.numel() == 0 or limit <= 0:
            return 0
        attention = self.new_token_attention(spec, candidates)
        score = deviation * attention
        picks = torch.topk(score, min(limit, candidates.numel())).indices
        picks = candidates[picks].sort().values
        self.recompute(spec.block_ids, record, picks)
        return int(picks.numel())

    def new_token_attention(self, spec: CorrectionSpec, positions: torch.Tensor
                            ) -> torch.Tensor:
        """Attention the new token pays ``positions``, mean over heads and all layers.

        A one-token forward of ``spec.token_id`` at ``spec.position`` through vLLM's modules,
        attending in float32 to its context ``[0, position)`` read from the paged cache and
        to its own K/V, which are never written (vLLM's forward writes them next)."""
        adapter, paged = self.adapter, self.paged
        slots = paged.slots(spec.block_ids, 0, spec.position)
        position = torch.tensor([spec.position])
        update, residual = adapter.embed(torch.tensor([spec.token_id])), None
        group = adapter.num_heads // adapter.num_kv_heads
        mass = torch.zeros(positions.numel())
        for layer in range(adapter.num_layers):
            x, residual = adapter.input_norm(layer, update, residual)
            q, k, v = adapter.qkv(layer, x)
            q, k = adapter.rope(q, k, position)
            keys, values = paged.read(layer, slots)
            keys = torch.cat((keys, k)).float()
            values = torch.cat((values, v)).float()
            q = q.float().reshape(adapter.num_kv_heads, group, adapter.head_dim)
            scale = paged.layers[layer].impl.scale
            probs = (torch.einsum("hgd,thd->hgt", q, keys) * scale).softmax(dim=-1)
            mass += probs[:, :, positions].mean(dim=(0, 1))
            if layer == adapter.num_layers - 1:
                break  # the last layer's output feeds only the logits
            out = torch.einsum("hgt,thd->hgd", probs, values).reshape(1, -1)
            x, residual = adapter.post_attention_norm(
                layer, adapter.o_proj(layer, out.to(adapter.dtype)), residual)
            update = adapter.mlp(layer, x)
        return mass / adapter.num_layers

    def recompute(self, block_ids: list[int], record: FillRecord, picks: torch.Tensor) -> None:
        """Recompute ``picks`` through every layer over the paged KV as it stands and write
        their rows (and only theirs) into the blocks."""
        adapter = self.adapter
        num_tokens = int(picks[-1]) + 1
        rows = PromptKV.empty(adapter, num_tokens, zeroed=False)
        adapter.bind(block_ids, write_from=record.start)
        engine = SelectiveRecomputeEngine(adapter, rho=(), check_layers=())
        engine.prefill(record.token_ids[:num_tokens], rows, picks, exact_prefix=record.start,
                       logits=False)
        slots = slots_of(block_ids, picks, self.paged.block_size)
        for layer in sorted(set(range(adapter.num_layers)) - adapter.written_layers):
            self.paged.write(layer, rows.keys[layer, picks], rows.values[layer, picks], slots)
