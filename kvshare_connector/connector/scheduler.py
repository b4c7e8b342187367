"""Scheduler-side half of the connector (runs in vLLM's EngineCore process).

It decides claims from token ids alone (it never sees KV): one lookup (embed, search
the tenant's scopes, align, plan) per request, cached because vLLM asks again after
preemption or when blocks run short. It owns the entry index, the single writer.

Entries are committed only after the worker confirms that all of a prompt's chunks
are held by the tiers (``KVShareWorkerMetadata.stored``), because the tiers the worker
writes (its CPU tier above all) are not visible from this process: only the worker
can say "stored". Chunk keys are content addressed, so the confirmation carries keys,
not KV.

Entries hold exact KV only: a prompt is stored when vLLM computed it itself (nothing
claimed), never when kvshare filled it approximately, so edits of edits do not
compound drift.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.v1.core.sched.output import SchedulerOutput

from kvshare.config import KVShareConfig
from kvshare.connector.metadata import (
    KVShareConnectorMetadata,
    KVShareWorkerMetadata,
    LoadReport,
    LoadSpec,
    Run,
    SaveSpec,
    SourceEntry,
)
from kvshare.matching.embedder import make_embedder
from kvshare.matching.matcher import PUBLIC_SCOPE, LookupResult, Matcher
from kvshare.matching.plan import ReusePlan
from kvshare.storage.index import EntryIndex

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

RHO_ARG = "kvshare_rho"
"""``SamplingParams.extra_args`` key that overrides the config's ``rho`` per request."""


def tenant_of(request: Request) -> str:
    """vLLM's ``cache_salt`` names the tenant; unsalted requests are the public scope."""
    return request.cache_salt or PUBLIC_SCOPE


@dataclass
class _Claim:
    """The answer ``get_num_new_matched_tokens`` last gave for a request."""

    num_computed: int
    """vLLM's own prefix-cache hit (block aligned)."""
    num_claimed: int


@dataclass
class _Prefill:
    """A request whose prompt KV will be stored once its prefill completes."""

    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    emitted: bool = False
    """A SaveSpec went out; the blocks are read in that step, so later changes don't matter."""


@dataclass
class _PendingEntry:
    """What the index entry needs once the worker confirms the chunks."""

    text: str
    token_ids: list[int]
    tenant: str
    lookup: LookupResult


class KVShareScheduler:
    """Claims, load plans and index commits; see the module docstring."""

    def __init__(self, config: KVShareConfig, model_id: str, tokenizer_dir: str) -> None:
        from transformers import AutoTokenizer

        self.config = config
        embedder = make_embedder(config.embedder, config.embed_max_chars,
                                 cache_dir=config.home_dir / "wordllama")
        index = EntryIndex(config.index_dir, embedder.dim,
                           ann_min_rows=config.ann_index_min_rows,
                           flush_rows=config.index_flush_rows)
        self.matcher = Matcher.from_config(config, index, embedder, model_id)
        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self._lookups: dict[str, LookupResult] = {}
        self._claims: dict[str, _Claim] = {}
        self._requests: dict[str, Request] = {}
        self._loads_due: set[str] = set()
        self._prefills: dict[str, _Prefill] = {}
        self._pending: dict[str, _PendingEntry] = {}
        self._reports: dict[str, LoadReport] = {}

    # ------------------------------------------------------------------ claims
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """Tokens beyond vLLM's own hit that kvshare will fill; no side effect but caching."""
        prompt = request.prompt_token_ids or []
        limit = len(prompt) - 1 - num_computed_tokens
        self._requests[request.request_id] = request
        lookup = self._lookup(request)
        claim = 0
        if limit > 0 and lookup is not None and self._worth_loading(lookup.plan,
                                                                     num_computed_tokens):
            claim = limit
        self._claims[request.request_id] = _Claim(num_computed_tokens, claim)
        return claim

    def _lookup(self, request: Request) -> LookupResult | None:
        req_id = request.request_id
        if req_id not in self._lookups:
            prompt = list(request.prompt_token_ids or [])
            if len(prompt) < 2:
                return None
            text = self._tokenizer.decode(prompt)
            self._lookups[req_id] = self.matcher.lookup(text, prompt, tenant_of(request))
        return self._lookups[req_id]

    def _worth_loading(self, plan: ReusePlan, num_computed: int) -> bool:
        """The plan passes both thresholds and reuses something vLLM has not computed."""
        if (plan.reuse_fraction < self.config.min_reuse_fraction
                or plan.reused_tokens < self.config.min_reuse_tokens):
            return False
        return any(run.dst_end > num_computed for run in plan.runs)

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            claim = self._claims[request.request_id]
            if claim.num_claimed != num_external_tokens:
                raise RuntimeError(
                    f"kvshare claimed {claim.num_claimed} tokens for {request.request_id} but "
                    f"vLLM allocated for {num_external_tokens}"
                )
            self._loads_due.add(request.request_id)

    # ------------------------------------------------------------------ per step
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVShareConnectorMetadata:
        meta = KVShareConnectorMetadata()
        num_scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            block_ids = list(new.block_ids[0])
            self._track(new.req_id, block_ids, replace=True)
            if new.req_id in self._loads_due:
                meta.loads.append(self._load_spec(new.req_id, block_ids))
            self._maybe_save(meta, new.req_id, new.num_computed_tokens + num_scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            resumed = req_id in cached.resumed_req_ids
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                self._track(req_id, list(new_blocks[0]), replace=resumed)
            if resumed and req_id in self._loads_due:
                meta.loads.append(self._load_spec(req_id, self._prefills[req_id].block_ids))
            self._maybe_save(meta, req_id, cached.num_computed_tokens[i] + num_scheduled[req_id])
        return meta

    def _track(self, req_id: str, block_ids: list[int], replace: bool) -> None:
        prefill = self._prefills.get(req_id)
        if prefill is None:
            request = self._requests.get(req_id)
            if request is None or not self._should_store(request):
                return
            prefill = self._prefills[req_id] = _Prefill(list(request.prompt_token_ids))
        prefill.block_ids = block_ids if replace else prefill.block_ids + block_ids

    def _should_store(self, request: Request) -> bool:
        """Long enough, computed by vLLM (exact), and not already an entry of its scope."""
        prompt = request.prompt_token_ids or []
        if len(prompt) < self.config.min_store_tokens:
            return False
        if self._claims.get(request.request_id, _Claim(0, 0)).num_claimed:
            return False
        lookup = self._lookups.get(request.request_id)
        return lookup is None or not any(
            hit.entry.scope == tenant_of(request) and hit.entry.num_tokens == len(prompt)
            and hit.entry.token_ids.tolist() == list(prompt)
            for hit in lookup.hits
        )

    def _maybe_save(self, meta: KVShareConnectorMetadata, req_id: str, computed_after: int
                    ) -> None:
        prefill = self._prefills.get(req_id)
        if prefill is None or prefill.emitted or computed_after < len(prefill.token_ids):
            return
        prefill.emitted = True
        meta.saves.append(SaveSpec(req_id, prefill.token_ids, prefill.block_ids))
        request = self._requests[req_id]
        lookup = self._lookups.get(req_id) or self._lookup(request)
        self._pending[req_id] = _PendingEntry(
            text=self._tokenizer.decode(prefill.token_ids), token_ids=prefill.token_ids,
            tenant=tenant_of(request), lookup=lookup)

    def _load_spec(self, req_id: str, block_ids: list[int]) -> LoadSpec:
        self._loads_due.discard(req_id)
        request, claim = self._requests[req_id], self._claims[req_id]
        lookup = self._lookups[req_id]
        start = claim.num_computed
        runs = []
        for run in lookup.plan.runs:
            skip = max(0, start - run.dst_start)
            if skip < run.length:
                runs.append(Run(run.dst_start + skip, run.entry_id, run.src_start + skip,
                                run.length - skip))
        entries = {hit.entry.entry_id: hit.entry for hit in lookup.hits}
        sources = {
            run.entry_id: SourceEntry(entries[run.entry_id].token_ids.tolist(),
                                      list(entries[run.entry_id].chunk_keys))
            for run in runs
        }
        extra = request.sampling_params.extra_args if request.sampling_params else None
        rho = float((extra or {}).get(RHO_ARG, self.config.rho))
        return LoadSpec(req_id=req_id, token_ids=list(request.prompt_token_ids),
                        block_ids=block_ids, num_computed=start, num_claimed=claim.num_claimed,
                        runs=runs, sources=sources, rho=rho)

    # ------------------------------------------------------------------ worker feedback
    def update_connector_output(self, worker_meta: KVShareWorkerMetadata | None) -> None:
        if worker_meta is None:
            return
        for req_id, keys in worker_meta.stored.items():
            pending = self._pending.pop(req_id, None)
            if pending is not None:
                self.matcher.insert(pending.text, pending.token_ids, pending.tenant,
                                    embedding=pending.lookup.embedding, chunk_keys=keys)
        for req_id in worker_meta.not_stored:
            self._pending.pop(req_id, None)
        for report in worker_meta.loads:
            self._reports[report.req_id] = report
            logger.info("kvshare: %s", report)

    def request_finished(self, request: Request) -> dict[str, Any] | None:
        """Forget the request; its load report (if the load step's output arrived) is
        returned to the user as ``kv_transfer_params["kvshare"]``."""
        req_id = request.request_id
        for table in (self._lookups, self._claims, self._requests, self._prefills):
            table.pop(req_id, None)
        self._loads_due.discard(req_id)
        report = self._reports.pop(req_id, None)
        return {"kvshare": report.as_dict()} if report is not None else None

    def shutdown(self) -> None:
        self.matcher.index.close()
