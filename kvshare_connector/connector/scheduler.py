"""Scheduler-side half of the connector (runs in vLLM's EngineCore process).

It decides claims from token ids alone (it never sees KV), with the one claim rule of
:mod:`kvshare.matching.claim`, and asks the :class:`~kvshare.catalog.Catalog` (the entry
index in this process, or the ``kvshare daemon``) for lookups and commits.

It must never stall or kill the EngineCore loop, so:

* a request's lookup (detokenize, embed, search, align) runs on a background thread;
  until it is done, ``get_num_new_matched_tokens`` answers ``None`` ("ask again next
  step") and vLLM schedules other work;
* prompts whose chunks are still being written (saves in flight) compete in lookups like
  indexed entries, and the worker serves their chunks from its save queue: a burst of
  similar prompts reuses its first member without waiting for its save;
* commits, drops, hit counts and load reports go to the catalog from a second
  background thread (the embedded catalog writes LanceDB on a thread of its own);
* the worker copies a prompt's KV out of its blocks after the step that returns its first
  token (see the worker), and a request preempted meanwhile has its copy discarded; a
  request that finishes before its save is answered keeps its blocks (``request_finished``
  answers "delay freeing", the worker's ``get_finished`` ends it), so vLLM keeps stepping
  until the entry is committed, and a shutdown that drains requests drains saves too;
* any exception on the lookup or store path means "claim nothing" / "store nothing" and
  one log line.

Entries are committed to the index only after the worker confirms that all of a
prompt's chunks are held by the tiers (``KVShareWorkerMetadata.stored``): the worker's
tiers (its CPU tier above all) are not visible from this process. Chunk keys are
computed here, when the save is sent, so a lookup can plan with an entry in flight.

Approximation depth. A prompt vLLM computed itself has exact KV (depth 0). A prompt
kvshare filled from reused rows is an approximation: it is stored with depth 1 + the
depth of its deepest source (up to ``max_approx_depth``), its exact leading tokens
recorded, and its approximate chunks under keys of their own. With vLLM's prefix caching
on, vLLM registers the blocks kvshare filled under the prompt's block hashes, so a later
request's prefix hit can consist of approximate blocks; :class:`ApproximateBlocks`
remembers those hashes so that such a request is stored as approximate too.

Per-request state and who removes it: ``_requests`` from a request's first
``get_num_new_matched_tokens`` to ``request_finished``; ``_saving`` from the step a
SaveSpec goes out to the worker's stored / not-stored answer (the worker answers every
SaveSpec); ``_last_saves`` and ``_held`` for one step; ``_late_reports`` from
``request_finished`` to the load report of the same step (dropped after
``LATE_REPORT_STEPS`` updates at the latest).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.v1.core.sched.output import SchedulerOutput

from kvshare.catalog import Catalog, LoadOutcome
from kvshare.config import KVShareConfig
from kvshare.connector.decode_correction import CorrectionPlanner, correction_wanted
from kvshare.connector.metadata import (
    KVShareConnectorMetadata,
    KVShareWorkerMetadata,
    LoadReport,
    LoadSpec,
    Run,
    SaveSpec,
    ShadowResult,
    ShadowSpec,
    SourceEntry,
)
from kvshare.connector.quality_gate import (
    GateSettings,
    QualityGate,
    sampled,
)
from kvshare.matching.claim import Claim, claimed_runs, decide_claim, kv_origin, tail_start
from kvshare.matching.matcher import PUBLIC_SCOPE, LookupResult
from kvshare.quality_scores import scores_path, write_scores
from kvshare.storage.index import IndexEntry, new_entry_id
from kvshare.storage.keys import chunk_keys

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

RHO_ARG = "kvshare_rho"
"""``SamplingParams.extra_args`` key that overrides the config's ``rho`` per request."""
PROMPT_TOKENS_ARG = "kvshare_prompt_tokens"
"""``SamplingParams.extra_args`` key for teacher-forced evaluation: prompt positions from
this one on are a forced continuation. Only the leading ones are looked up, planned and
claimed, and the request is never stored."""
STORE_ARG = "kvshare_store"
"""``SamplingParams.extra_args`` key (``vllm_xargs`` over HTTP): 0 or false keeps the
request's prompt out of the cache; it still reuses what the cache holds."""

LOOKUP_TIMEOUT_S = 5.0
"""A lookup still running after this long is given up: the request is computed by vLLM."""
LATE_REPORT_STEPS = 2
"""Output updates a finished request's report may arrive after ``request_finished``."""


def gate_settings(config: KVShareConfig) -> GateSettings:
    """The quality gate's settings from the config's ``shadow_*`` and ``gate_*`` keys."""
    return GateSettings(min_top1=config.shadow_min_top1, max_kl=config.shadow_max_kl,
                        window=config.gate_window, floor=config.gate_floor,
                        min_checks=config.gate_min_checks,
                        reopen_checks=config.gate_reopen_checks)


def tenant_of(request: Request, default_tenant: str = PUBLIC_SCOPE) -> str:
    """vLLM's ``cache_salt`` names the tenant; unsalted requests belong to the default."""
    return request.cache_salt or default_tenant


def encodable(name: str) -> bool:
    """Whether ``name`` is UTF-8 text, as the index, chunk keys and the daemon's messages
    need (a ``cache_salt`` holding a lone surrogate is not): other tenants claim nothing."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def stores(request: Request) -> bool:
    """Whether the request lets kvshare store its prompt (``STORE_ARG``)."""
    extra = request.sampling_params.extra_args if request.sampling_params else None
    return str((extra or {}).get(STORE_ARG, 1)).lower() not in ("0", "false", "no")


def prompt_tokens_of(request: Request) -> int:
    """Prompt tokens kvshare treats as the prompt (all, unless teacher forcing says less)."""
    total = len(request.prompt_token_ids or [])
    extra = request.sampling_params.extra_args if request.sampling_params else None
    forced = (extra or {}).get(PROMPT_TOKENS_ARG)
    if forced is None:
        return total
    if not isinstance(forced, int) or not 0 < forced <= total:
        raise ValueError(f"{PROMPT_TOKENS_ARG}={forced!r} must be an int in [1, {total}]")
    return forced


class ApproximateBlocks:
    """vLLM block hashes of KV that kvshare filled approximately, with its depth.

    vLLM caches at most ``capacity`` blocks and evicts the least recently used; a hash
    refreshed on every hit and forgotten after ``capacity`` newer ones cannot belong to a
    block vLLM still holds, so the table's bound loses nothing that matters.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._depth: OrderedDict[Any, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._depth)

    def mark(self, block_hashes: list[Any], depth: int) -> None:
        for block_hash in block_hashes:
            self._depth[block_hash] = max(depth, self._depth.get(block_hash, 0))
            self._depth.move_to_end(block_hash)
        while len(self._depth) > self.capacity:
            self._depth.popitem(last=False)

    def first_approximate(self, block_hashes: list[Any]) -> tuple[int, int] | None:
        """(index of the first approximate block, deepest depth among them) or None."""
        first, depth = None, 0
        for i, block_hash in enumerate(block_hashes):
            found = self._depth.get(block_hash)
            if found is not None:
                self._depth.move_to_end(block_hash)
                first = i if first is None else first
                depth = max(depth, found)
        return None if first is None else (first, depth)


@dataclass
class _Origin:
    """Where a request's KV comes from, decided once its claim is known."""

    exact_tokens: int
    """Leading tokens whose KV is exact."""
    depth: int
    """0 = all exact; else 1 + the deepest approximate source."""


@dataclass
class _RequestState:
    request: Request
    tenant: str
    prompt_tokens: int
    lookup: Future[LookupResult] | None = None
    lookup_started: float = 0.0
    result: LookupResult | None = None
    gave_up: bool = False
    """The lookup failed or timed out: claim nothing, store nothing."""
    claim: Claim | None = None
    origin: _Origin | None = None
    block_ids: list[int] = field(default_factory=list)
    load_due: bool = False
    load_async: bool = False
    """vLLM loads this request's claim asynchronously (``fill_mode: async``)."""
    loads_out: int = 0
    """LoadSpecs sent whose report has not come back."""
    report: LoadReport | None = None
    save_sent: bool = False
    withheld: bool = False
    """The quality gate was closed for this request's scope: its claim was withheld."""
    shadow: bool = False
    """A shadow check of this request's fill (or withheld claim) was sent."""
    source_depth: int = 0
    """Deepest approximation depth among the entries the claim reads."""


@dataclass
class _Saving:
    """An entry waiting for the worker to confirm its chunks."""

    entry: IndexEntry


class KVShareScheduler:
    """Claims, load plans and index commits; see the module docstring."""

    def __init__(self, config: KVShareConfig, model_id: str, tokenizer_dir: str,
                 catalog: Catalog, *, hash_block_size: int, num_kv_blocks: int,
                 kv_bytes_per_token: int, step_tokens: int, num_layers: int) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.model_id = model_id
        self.catalog = catalog
        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self._hash_block_size = hash_block_size
        self._kv_bytes_per_token = kv_bytes_per_token
        self._step_tokens = step_tokens
        """vLLM's token budget per step (``max_num_batched_tokens``)."""
        self._num_layers = num_layers
        self.approximate_blocks = ApproximateBlocks(capacity=num_kv_blocks)
        self._requests: dict[str, _RequestState] = {}
        self._saving: dict[str, _Saving] = {}
        self._committing: dict[str, IndexEntry] = {}
        """Entries stored and on their way into the catalog: until the commit call has
        run they stay visible to lookups as in flight. Written by both threads."""
        self._committing_lock = threading.Lock()
        self._last_saves: set[str] = set()
        """Requests whose SaveSpec went out in the latest step: the worker copies their KV
        out of their blocks until the next step begins."""
        self._held: set[str] = set()
        """Requests finished with their save unanswered since the latest step, to tell the
        worker in the next one."""
        self._late_reports: dict[str, tuple[int, dict[str, Any]]] = {}
        self._updates = 0
        self._lookups = ThreadPoolExecutor(1, thread_name_prefix="kvshare-lookup")
        self._hits = ThreadPoolExecutor(1, thread_name_prefix="kvshare-hits")
        """Hit counts and load reports to the catalog (a daemon call is a round trip)."""
        self._catalog_down = False
        """The latest catalog write found the daemon unreachable (written by ``_hits``)."""
        self.gate = QualityGate(gate_settings(config))
        self._fills_due: list[str] = []
        """Requests vLLM allocated blocks for an asynchronous load this step: their fills
        go out with this step's metadata (vLLM schedules them only once filled)."""
        self._fills_in_flight: set[str] = set()
        """Requests loaded asynchronously whose fill the worker has not named finished."""
        self._shadows_due: list[ShadowSpec] = []
        """Checks of withheld claims, sent with the next step's metadata."""
        self._withheld_checks: dict[str, str] = {}
        """Scope -> the request whose withheld claim is being checked (one per scope)."""
        self.quality_counts: Counter[str] = Counter()
        """Shadow checks by outcome (``done``, ``dropped``, ``error``), ``failed`` checks,
        gate ``closures`` and ``reopenings``, since the last :meth:`take_quality_counts`."""
        self.corrections = CorrectionPlanner(config)
        """Decode corrections of reused requests (:mod:`kvshare.connector.decode_correction`)."""

    # ------------------------------------------------------------------ claims
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> int | None:
        """Tokens beyond vLLM's own hit that kvshare will fill, or None: ask again."""
        try:
            state = self._state_of(request)
            if not self._lookup_ready(state):
                return None
            state.claim = (decide_claim(state.result.plan, num_computed_tokens, self.config,
                                        state.result.entries)
                           if state.result is not None
                           else Claim(num_computed_tokens, num_computed_tokens, 0))
            state.withheld = state.claim.num_claimed > 0 and not self.gate.is_open(state.tenant)
            if state.withheld:
                self._check_withheld(state)
                state.claim = Claim(num_computed_tokens, num_computed_tokens, 0)
            state.origin = self._origin(state, num_computed_tokens)
            state.load_async = state.claim.num_claimed > 0 and self.config.fill_mode == "async"
            if (state.load_async and request.request_id not in self._fills_in_flight
                    and len(self._fills_in_flight) >= self.config.max_fills_in_flight):
                return None  # a fill in flight ends within a few steps; vLLM asks again
            return state.claim.num_claimed
        except Exception:
            logger.exception("kvshare: lookup of %s failed; claiming nothing",
                             request.request_id)
            state = self._requests.get(request.request_id)
            if state is not None:
                state.gave_up, state.result, state.claim, state.origin = True, None, None, None
            return 0

    def _state_of(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = _RequestState(
                request, tenant_of(request, self.config.default_tenant),
                prompt_tokens_of(request))
        return state

    def _check_withheld(self, state: _RequestState) -> None:
        """Shadow-check the claim the gate withholds (``state.claim``), unless a withheld
        claim of the same scope is being checked: passing checks reopen the gate."""
        if state.shadow or state.tenant in self._withheld_checks:
            return
        self._withheld_checks[state.tenant] = state.request.request_id
        self._shadows_due.append(ShadowSpec(self._load_spec(state, []), state.tenant,
                                            withheld=True))
        state.shadow = True

    def _lookup_ready(self, state: _RequestState) -> bool:
        """Whether the request's lookup is final: ``state.result`` is then the lookup, or
        None when there is nothing to reuse (too short, failed, timed out)."""
        if state.gave_up or state.result is not None:
            return True
        if state.prompt_tokens < 2 or not encodable(state.tenant):
            state.gave_up = True
            return True
        if state.lookup is None:
            self._submit_lookup(state)
            return False
        if not state.lookup.done():
            if time.perf_counter() - state.lookup_started > LOOKUP_TIMEOUT_S:
                logger.warning("kvshare: lookup of %s took over %.0f s; claiming nothing",
                               state.request.request_id, LOOKUP_TIMEOUT_S)
                state.gave_up = True
                return True
            return False
        state.result = state.lookup.result()  # raises what the lookup raised
        return True

    def _submit_lookup(self, state: _RequestState) -> None:
        ids = list(state.request.prompt_token_ids[:state.prompt_tokens])
        with self._committing_lock:
            in_flight = [saving.entry for saving in self._saving.values()]
            in_flight += self._committing.values()
        state.lookup_started = time.perf_counter()
        state.lookup = self._lookups.submit(self._lookup, ids, state.tenant, in_flight)

    def _lookup(self, token_ids: list[int], tenant: str, in_flight: list[IndexEntry]
                ) -> LookupResult:
        text = self._tokenizer.decode(token_ids)
        return self.catalog.lookup(self.model_id, text, token_ids, tenant, in_flight)

    def _origin(self, state: _RequestState, num_computed: int) -> _Origin:
        """Exact leading tokens and depth of the KV this request will have."""
        exact, depth = len(state.request.prompt_token_ids), 0
        hit_blocks = state.request.block_hashes[:num_computed // self._hash_block_size]
        approximate = self.approximate_blocks.first_approximate(hit_blocks)
        if approximate is not None:
            exact, depth = approximate[0] * self._hash_block_size, approximate[1]
        if state.claim.num_claimed == 0:
            return _Origin(exact, depth)
        return _Origin(*kv_origin(state.claim, state.result.plan, state.result.entries, exact,
                                  depth))

    def loads_async(self, req_id: str) -> bool:
        """Whether the claim just answered for this request is loaded asynchronously."""
        state = self._requests.get(req_id)
        return state is not None and state.load_async

    def loads_finished(self, req_ids: Iterable[str]) -> None:
        """The worker named these asynchronous loads finished (``finished_recving``): their
        fill slots are free."""
        self._fills_in_flight.difference_update(req_ids)

    def update_state_after_alloc(self, request: Request, num_external_tokens: int,
                                 block_ids: list[int] | None = None) -> None:
        """vLLM allocated ``block_ids`` (all of the request's) for the claim; an
        asynchronous load goes out with this step's metadata."""
        if num_external_tokens <= 0:
            return
        state = self._requests[request.request_id]
        if state.claim is None or state.claim.num_claimed != num_external_tokens:
            raise RuntimeError(
                f"kvshare claimed {state.claim and state.claim.num_claimed} tokens for "
                f"{request.request_id} but vLLM allocated for {num_external_tokens}")
        state.load_due = True
        if state.load_async:
            state.block_ids = list(block_ids or ())
            self._fills_due.append(request.request_id)
            self._fills_in_flight.add(request.request_id)

    # ------------------------------------------------------------------ per step
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVShareConnectorMetadata:
        meta = KVShareConnectorMetadata()
        for req_id in self._fills_due:
            state = self._requests.get(req_id)
            if state is not None:
                self._on_scheduled(meta, state)
        self._fills_due = []
        num_scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._on_scheduled(meta, state)
            self._maybe_save(meta, state, new.num_computed_tokens + num_scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            resumed = req_id in cached.resumed_req_ids
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                blocks = list(new_blocks[0])
                state.block_ids = blocks if resumed else state.block_ids + blocks
            if resumed:
                self._on_scheduled(meta, state)
            self._maybe_save(meta, state, cached.num_computed_tokens[i] + num_scheduled[req_id])
        # Preempted since the last step (and possibly resumed by now, in other blocks).
        preempted = set(scheduler_output.preempted_req_ids or ()) | set(cached.resumed_req_ids)
        meta.discarded_saves = self._last_saves & preempted
        self._last_saves = {spec.req_id for spec in meta.saves}
        meta.held_for_save, self._held = self._held, set()
        meta.corrections, meta.corrections_dropped = self.corrections.plan(scheduler_output)
        meta.shadows += self._shadows_due
        self._shadows_due = []
        meta.fill_token_layers = self._fill_token_layers(
            scheduler_output.total_num_scheduled_tokens)
        return meta

    def _fill_token_layers(self, scheduled_tokens: int) -> int | None:
        """This step's budget for asynchronous fills (``KVShareConnectorMetadata.
        fill_token_layers``): a step with fills then costs about what a step of vLLM's
        full token budget costs, so running requests decode no slower beside a fill than
        beside a prefill chunk, and fills use the capacity vLLM leaves idle."""
        if scheduled_tokens == 0:
            return None
        unused = max(0, self._step_tokens - scheduled_tokens) * self._num_layers
        return max(self.config.fill_tokens_per_step, unused)

    def delays_free(self, req_id: str) -> bool:
        """Whether a request finishing now keeps its blocks until the worker says so: its
        save is unanswered (its KV may still be being copied out of them)."""
        if req_id not in self._saving:
            return False
        self._held.add(req_id)
        return True

    def _on_scheduled(self, meta: KVShareConnectorMetadata, state: _RequestState) -> None:
        """First scheduling (or resumption after preemption): load what was claimed."""
        if state.origin is not None and state.origin.depth > 0:
            self._mark_approximate(state)
        if state.load_due:
            state.load_due = False
            meta.loads.append(self._load_spec(state, state.block_ids))
            if not state.shadow and sampled(state.request.request_id,
                                            self.config.shadow_sample_rate):
                meta.shadows.append(ShadowSpec(self._load_spec(state, []), state.tenant))
                state.shadow = True
            state.loads_out += 1
            self._hits.submit(self._quietly, self.catalog.record_hits,
                              state.result.plan.source_entries)

    def _mark_approximate(self, state: _RequestState) -> None:
        """vLLM's prefix cache now holds this request's approximate blocks under its hashes."""
        if self.config.strict_prefix_cache:
            return  # prefix caching is off: vLLM reuses nothing
        first = state.origin.exact_tokens // self._hash_block_size
        self.approximate_blocks.mark(list(state.request.block_hashes[first:]),
                                     state.origin.depth)

    def _load_spec(self, state: _RequestState, block_ids: list[int]) -> LoadSpec:
        """The fill of ``state.claim`` into ``block_ids`` (none for a shadow check)."""
        request, claim, result = state.request, state.claim, state.result
        runs = [Run(run.dst_start, run.entry_id, run.src_start, run.length)
                for run in claimed_runs(result.plan, claim)]
        entries = result.entries
        sources = {
            run.entry_id: SourceEntry(entries[run.entry_id].token_ids.tolist(),
                                      list(entries[run.entry_id].chunk_keys))
            for run in runs
        }
        state.source_depth = max((entries[entry_id].depth for entry_id in sources), default=0)
        extra = request.sampling_params.extra_args if request.sampling_params else None
        rho = float((extra or {}).get(RHO_ARG, self.config.rho))
        adaptive = self.config.rho_mass > 0 and RHO_ARG not in (extra or {})
        return LoadSpec(req_id=request.request_id, token_ids=list(request.prompt_token_ids),
                        block_ids=block_ids, num_computed=claim.start,
                        num_claimed=claim.num_claimed, runs=runs, sources=sources, rho=rho,
                        verbatim_end=claim.verbatim_end,
                        adaptive=adaptive, load_async=state.load_async,
                        decode_correction=correction_wanted(request, self.config),
                        tail_start=max(claim.start, min(claim.end, tail_start(
                            state.prompt_tokens, self.config))))

    def _maybe_save(self, meta: KVShareConnectorMetadata, state: _RequestState,
                    computed_after: int) -> None:
        prompt = state.request.prompt_token_ids
        if state.save_sent or computed_after < len(prompt):
            return
        state.save_sent = True
        try:
            entry = self._entry_to_store(state)
        except Exception:
            logger.exception("kvshare: not storing %s", state.request.request_id)
            return
        if entry is None:
            return
        meta.saves.append(SaveSpec(state.request.request_id, list(prompt), state.block_ids,
                                   scope=entry.scope, entry_id=entry.entry_id,
                                   exact_tokens=entry.exact_tokens))
        self._saving[state.request.request_id] = _Saving(entry)

    def _entry_to_store(self, state: _RequestState) -> IndexEntry | None:
        """The entry a finished prefill becomes, or None when it is not worth storing."""
        prompt = list(state.request.prompt_token_ids)
        result, origin = state.result, state.origin
        if (state.gave_up or result is None or origin is None or not stores(state.request)
                or state.prompt_tokens < len(prompt) or len(prompt) < self.config.min_store_tokens
                or origin.depth > self.config.max_approx_depth):
            return None
        if any(hit.entry.scope == state.tenant and hit.entry.num_tokens == len(prompt)
               and hit.entry.token_ids.tolist() == prompt and hit.entry.depth <= origin.depth
               for hit in result.hits):
            return None  # this scope already holds this prompt, at least as exact
        entry_id, exact_tokens = new_entry_id(), min(origin.exact_tokens, len(prompt))
        keys = chunk_keys(self.model_id, prompt, self.config.chunk_tokens,
                          scope=state.tenant, exact_tokens=exact_tokens, variant=entry_id)
        return IndexEntry(
            entry_id=entry_id, model_id=self.model_id, scope=state.tenant,
            embedding=result.embedding, token_ids=prompt,
            text_preview=self._tokenizer.decode(prompt[:64]),
            chunk_keys=[key.hex() for key in keys], depth=origin.depth,
            exact_tokens=exact_tokens)

    # ------------------------------------------------------------------ worker feedback
    def update_connector_output(self, worker_meta: KVShareWorkerMetadata | None) -> None:
        self._updates += 1
        self.corrections.take(worker_meta.corrections if worker_meta is not None else [])
        if worker_meta is not None:
            self._commit(worker_meta)
            for report in worker_meta.loads:
                self._take_report(report)
            if worker_meta.shadows:
                for result in worker_meta.shadows:
                    self._take_shadow(result)
                self._hits.submit(self._quietly, write_scores,
                                  scores_path(self.config.home_dir, self.model_id),
                                  self.gate.snapshot(self.model_id))
        for req_id, (update, _) in list(self._late_reports.items()):
            if self._updates - update >= LATE_REPORT_STEPS:
                del self._late_reports[req_id]

    def _commit(self, worker_meta: KVShareWorkerMetadata) -> None:
        committed = []
        for req_id, keys in worker_meta.stored.items():
            saving = self._saving.pop(req_id, None)
            if saving is None:
                continue
            if keys != saving.entry.chunk_keys:  # both sides call storage.keys.chunk_keys
                logger.error("kvshare: the worker stored %s under other keys than planned; "
                             "not indexing it", req_id)
                continue
            committed.append(saving.entry)
        for req_id in worker_meta.not_stored:
            self._saving.pop(req_id, None)
        if committed:
            with self._committing_lock:
                self._committing.update((entry.entry_id, entry) for entry in committed)
            self._hits.submit(self._commit_entries, committed)
        if worker_meta.missing_entries:
            logger.info("kvshare: dropping %d entries whose chunks are gone",
                        len(worker_meta.missing_entries))
            self._hits.submit(self._quietly, self.catalog.drop, worker_meta.missing_entries)

    def _take_report(self, report: LoadReport) -> None:
        logger.info("kvshare: %s", report)
        state = self._requests.get(report.req_id)
        if state is not None:
            self._hits.submit(self._quietly, self.catalog.report_load, LoadOutcome(
                state.tenant, report.claimed, report.reused, report.recomputed,
                report.fallback))
            state.report = report
            state.loads_out = max(0, state.loads_out - 1)
            self.corrections.on_load_report(state.request, report,
                                            correction_wanted(state.request, self.config))
            return
        late = self._late_reports.pop(report.req_id, None)
        if late is not None:
            late[1].update(report.as_dict())

    def _take_shadow(self, result: ShadowResult) -> None:
        """Score one answered shadow check; open or close the gate as it says."""
        if self._withheld_checks.get(result.scope) == result.req_id:
            del self._withheld_checks[result.scope]
        self.quality_counts[result.outcome] += 1
        if result.outcome != "done":
            return
        passed = self.gate.settings.passes(result.top1, result.kl)
        self.quality_counts["failed"] += not passed
        logger.info("kvshare: shadow check of %s (scope %r%s): top-1 agreement %.2f, KL %.4f "
                    "nats over %d positions, %s, %.2f s", result.req_id, result.scope,
                    ", claim withheld" if result.withheld else "", result.top1, result.kl,
                    result.positions, "passed" if passed else "FAILED", result.seconds)
        settings = self.gate.settings
        for change in self.gate.record(result.scope, result.top1, result.kl):
            domain = "every scope" if change.scope is None else f"scope {change.scope!r}"
            if change.opened:
                self.quality_counts["reopenings"] += 1
                logger.warning("kvshare: quality gate reopened for %s after %d passing shadow "
                               "checks; claiming again", domain, settings.reopen_checks)
            else:
                self.quality_counts["closures"] += 1
                logger.warning(
                    "kvshare: quality gate closed for %s: %.0f%% of its last shadow checks "
                    "passed (floor %.0f%%); not claiming until %d checks in a row pass",
                    domain, 100 * change.score, 100 * settings.floor, settings.reopen_checks)

    def take_quality_counts(self) -> Counter[str]:
        """The shadow-check and gate counts since the last call (for connector stats)."""
        counts, self.quality_counts = self.quality_counts, Counter()
        return counts

    def request_finished(self, request: Request) -> dict[str, Any] | None:
        """Forget the request; return its load report as ``kv_transfer_params["kvshare"]``.

        A request that finishes in its load step (``max_tokens=1``, EOS first) is
        finished before this step's worker output is read: its report dict is handed to
        vLLM now and filled in place by :meth:`update_connector_output` of the same step,
        before vLLM sends the output.
        """
        state = self._requests.pop(request.request_id, None)
        self._fills_in_flight.discard(request.request_id)
        if state is None:
            return None
        if state.lookup is not None:
            state.lookup.cancel()
        if state.origin is not None and state.origin.depth > 0:
            self._mark_approximate(state)  # its output blocks are approximate too
        if state.withheld:  # says why this request was not reused
            return {"kvshare": {"claimed": 0, "loaded": 0, "recomputed": 0, "reused": 0,
                                "fallback": False, "sources": 0, "depth": state.origin.depth,
                                "source_depth": 0, "gate": "closed", "shadow": state.shadow}}
        if state.report is None and not state.loads_out:
            return None
        # The approximation depth of the request's KV: 0 exact, else 1 + its deepest source.
        report: dict[str, Any] = {"depth": state.origin.depth,
                                  "source_depth": state.source_depth, "gate": "open",
                                  "shadow": state.shadow}
        if state.loads_out:
            self._late_reports[request.request_id] = (self._updates, report)
        else:
            report.update(state.report.as_dict())
        self.corrections.finished(request.request_id, report)
        return {"kvshare": report}

    # ------------------------------------------------------------------ scheduling hints
    def prefetch(self, request: Request) -> None:
        """Start the request's lookup now, on arrival, rather than when vLLM first asks for
        its claim (for :class:`kvshare.scheduler.CacheAwareScheduler`, which ranks waiting
        requests by what their lookups found)."""
        try:
            self._lookup_ready(self._state_of(request))
        except Exception:
            logger.exception("kvshare: lookup of %s could not start", request.request_id)

    def expected_claim(self, request: Request) -> Claim | None:
        """The claim kvshare would make for the request without a vLLM prefix hit, or None
        while its lookup runs. No claim (``num_claimed == 0``) when the lookup found nothing
        worth claiming, failed, or the quality gate withholds the request's scope."""
        state = self._requests.get(request.request_id)
        if state is None:
            return None
        try:
            if not self._lookup_ready(state):
                return None
        except Exception:  # the claim query logs it and claims nothing
            return Claim(0, 0, 0)
        if state.result is None or not self.gate.is_open(state.tenant):
            return Claim(0, 0, 0)
        return decide_claim(state.result.plan, 0, self.config, state.result.entries)

    def claims_filling(self) -> list[Claim]:
        """The claims whose asynchronous fill is in flight (vLLM has not been told they
        are done)."""
        return [self._requests[req_id].claim for req_id in self._fills_in_flight
                if req_id in self._requests and self._requests[req_id].claim is not None]

    # ------------------------------------------------------------------ catalog calls
    def _commit_entries(self, entries: list[IndexEntry]) -> None:
        try:
            self._quietly(self.catalog.commit, entries, self._kv_bytes_per_token)
        finally:
            with self._committing_lock:
                for entry in entries:
                    self._committing.pop(entry.entry_id, None)

    def _quietly(self, call: Callable[..., object], *args: object) -> None:
        """Catalog writes run on a background thread; a failure loses a hit count, an
        entry or a report, never a request. An unreachable daemon is one log line per
        outage, not one traceback per call."""
        try:
            call(*args)
        except ConnectionError as exc:  # the daemon's DaemonUnavailable
            if not self._catalog_down:
                self._catalog_down = True
                logger.warning("kvshare: %s; catalog writes are dropped until it answers", exc)
            return
        except Exception:
            logger.exception("kvshare: %s failed", getattr(call, "__name__", call))
            return
        if self._catalog_down:
            self._catalog_down = False
            logger.info("kvshare: the catalog answers again")

    def wait_for_catalog(self) -> None:
        """Return once every catalog call queued so far has run (FIFO, one thread)."""
        self._hits.submit(lambda: None).result()

    def shutdown(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)
        self._hits.shutdown(wait=True)
        self.catalog.close()
