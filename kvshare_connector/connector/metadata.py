"""What the scheduler-side connector tells the worker each step, and what comes back.

Everything here is pickled across the EngineCore -> Worker boundary every step, so it
holds plain lists and numbers, never tensors or vLLM objects. Positions are 0-based
token indices into the request's prompt; lengths are in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class SourceEntry:
    """A cached prompt that some runs of a plan copy KV from."""

    token_ids: list[int]
    chunk_keys: list[str]
    """Hex chunk keys in token order (``kvshare.storage.keys.chunk_keys``)."""


@dataclass
class Run:
    """Prompt positions ``[dst_start, dst_start + length)`` take the KV of source positions
    ``[src_start, src_start + length)`` of ``entry_id``; keys move by ``dst - src``."""

    dst_start: int
    entry_id: str
    src_start: int
    length: int


@dataclass
class LoadSpec:
    """Fill the claimed tokens ``[num_computed, num_computed + num_claimed)`` of one request.

    Invariant: ``num_computed + num_claimed <= len(token_ids) - 1``: vLLM computes at
    least the last prompt token itself (and the tail after the claim, see
    ``kvshare.matching.claim``). Positions below ``num_computed`` are vLLM's own
    prefix-cache hit (KV already in the request's blocks): read, never written.
    """

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_computed: int
    num_claimed: int
    runs: list[Run]
    """Only runs (or their parts) at positions >= ``num_computed``."""
    sources: dict[str, SourceEntry]
    rho: float
    """DHD share of reused tokens recomputed (config ``rho`` or the request's override)."""
    tail_start: int
    """Claimed positions from here on are always recomputed (the prompt's tail when kvshare
    computes it; ``end`` when vLLM does)."""
    verbatim_end: int = 0
    """Claimed positions below this copy their source's exact prefix at the same positions
    (``kvshare.matching.claim.Claim.verbatim``): the fill loads them and never recomputes
    them, like vLLM's own prefix hit. At most ``num_computed`` when there are none."""
    adaptive: bool = False
    """The config's adaptive budget (``rho_mass``) replaces ``rho``: set, and not
    overridden by the request."""
    decode_correction: bool = False
    """Keep what a decode correction needs from this fill (the reused, not recomputed
    tokens and their deviation; see :mod:`kvshare.connector.decode_correction`)."""
    load_async: bool = False
    """vLLM loads this request asynchronously (``fill_mode: async``): the worker advances
    the fill a bounded slice per step and names the request in ``get_finished`` once it
    is done; otherwise the whole fill runs in the step that receives it."""

    @property
    def end(self) -> int:
        """One past the last claimed position."""
        return self.num_computed + self.num_claimed


@dataclass
class SaveSpec:
    """After this step the request's whole prompt KV is in its blocks: store it as chunks.

    Chunk keys follow ``kvshare.storage.keys.chunk_keys``: namespaced by ``scope``; chunks
    past ``exact_tokens`` hold approximate KV and carry ``entry_id`` as their variant.
    """

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    scope: str
    entry_id: str
    exact_tokens: int
    """Leading tokens whose KV vLLM or kvshare computed exactly (all of them at depth 0)."""


@dataclass
class ShadowSpec:
    """Check one request's fill against full compute, in the background (a shadow check).

    ``fill`` is the fill the request got (or would have got, had the quality gate not
    withheld its claim), without blocks: the check computes densely and never touches
    vLLM's paged cache.
    """

    fill: LoadSpec
    """The claim's load plan; its ``block_ids`` are empty."""
    scope: str
    """The request's sharing scope (its tenant): the gate keeps a score per scope."""
    withheld: bool = False
    """The gate withheld this claim; vLLM computed the request in full."""


SHADOW_OUTCOMES = ("done", "dropped", "error")
"""``done``: compared; ``dropped``: the checker was busy; ``error``: the check raised."""


@dataclass
class ShadowResult:
    """How a shadow check's fill compared with full compute on the prompt's last positions.

    The worker answers every :class:`ShadowSpec` with one result, also when it drops or
    fails the check (then only ``outcome`` is meaningful).
    """

    req_id: str
    scope: str
    withheld: bool
    outcome: str
    """One of ``SHADOW_OUTCOMES``."""
    top1: float = 0.0
    """Share of the compared positions whose most likely next token is full compute's."""
    kl: float = 0.0
    """Mean KL(full compute || fill) of the next-token distributions, in nats."""
    positions: int = 0
    """Prompt positions compared (the last ones, computed after the claim as vLLM does)."""
    seconds: float = 0.0
    """Wall time of the check (full compute, fill and comparison); the first check's
    includes loading the checks' model."""


@dataclass
class CorrectionSpec:
    """Correct one reused request's KV before vLLM's forward of ``token_id`` at ``position``
    (see :mod:`kvshare.connector.decode_correction`)."""

    req_id: str
    token_id: int
    """The generated token whose queries score the reused tokens."""
    position: int
    """Its position: rows ``[0, position)`` of the request's blocks are its context."""
    block_ids: list[int]
    writable_blocks: list[int]
    """Blocks the correction may change: held by this request alone (vLLM ref count 1),
    never blocks that vLLM's prefix cache shares with another running request."""


@dataclass
class CorrectionReport:
    """What one :class:`CorrectionSpec` did."""

    req_id: str
    corrected: int
    """Reused, not recomputed tokens whose K/V were recomputed through every layer."""
    deferred: bool = False
    """The step's budget was spent: nothing done, send it again in a later step."""
    seconds: float = 0.0


@dataclass
class KVShareConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one per engine step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    discarded_saves: set[str] = field(default_factory=set)
    """Requests of the previous step's saves preempted since: their blocks may already
    hold another request's KV, so their copies are dropped, never stored."""
    held_for_save: set[str] = field(default_factory=set)
    """Requests that finished with their save unanswered: vLLM keeps their blocks, and
    the engine stepping, until the worker names them in ``get_finished``."""
    shadows: list[ShadowSpec] = field(default_factory=list)
    """Fills to check against full compute in the background (sampled, or withheld by
    the quality gate)."""
    corrections: list[CorrectionSpec] = field(default_factory=list)
    """Decode corrections to run before this step's forward."""
    corrections_dropped: set[str] = field(default_factory=set)
    """Requests preempted since the last step: the worker forgets their fills' records
    (a resumed request is filled again and corrected from that fill)."""
    fill_token_layers: int | None = None
    """Model work the asynchronous fills may do this step, in token-layers: what vLLM's
    token budget leaves unused this step, times the model's layers, and at least
    ``fill_tokens_per_step``. None when vLLM computes no request this step: the fills in
    flight run to their end, since no running request waits for them."""


@dataclass
class LoadReport:
    """How one claim was filled: returned to the user as ``kv_transfer_params["kvshare"]``.

    All counts are prompt tokens inside the claim ``[num_computed, num_computed + claimed)``;
    vLLM's own prefix-cache hit is not part of them.
    """

    req_id: str
    claimed: int
    """Tokens kvshare filled, so vLLM did not compute them."""
    loaded: int
    """Claimed tokens whose KV came from the tiers (chunks found and verified)."""
    recomputed: int
    """Claimed tokens kvshare computed: placeholders, boundaries, tokens of missing chunks,
    DHD picks, and the tail when kvshare computes it (or all, after a fallback)."""
    fallback: bool
    """True when the selective fill failed and the claim was recomputed in full."""
    seconds: float
    """Wall time of the worker's load + re-rotation + selective recompute + writes."""
    load_seconds: float = 0.0
    """The part of ``seconds`` spent fetching source chunks and re-rotating their keys."""
    sources: int = 0
    """Source entries the plan's runs copy KV from."""

    @property
    def reused(self) -> int:
        """Claimed tokens loaded and not recomputed: what "reused" means everywhere."""
        return self.claimed - self.recomputed

    def as_dict(self) -> dict[str, float | int | bool]:
        """The user-facing report: counts and timings (entry ids stay inside kvshare)."""
        report = {name: value for name, value in vars(self).items() if name != "req_id"}
        report["reused"] = self.reused
        return report


@dataclass
class KVShareWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, one per engine step (aggregated over workers)."""

    stored: dict[str, list[str]] = field(default_factory=dict)
    """Request id -> hex chunk keys now held by the tiers (all of the prompt's chunks)."""
    not_stored: set[str] = field(default_factory=set)
    """Requests whose chunks could not all be stored; their entries are not committed."""
    loads: list[LoadReport] = field(default_factory=list)
    missing_entries: set[str] = field(default_factory=set)
    """Entries some of whose chunks the tiers no longer hold (found by a load)."""
    shadows: list[ShadowResult] = field(default_factory=list)
    """Shadow checks answered since the last step."""
    corrections: list[CorrectionReport] = field(default_factory=list)
    """Decode corrections run (or deferred) this step."""

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVShareWorkerMetadata)
        return KVShareWorkerMetadata(
            stored={**self.stored, **other.stored},
            not_stored=self.not_stored | other.not_stored,
            loads=self.loads + other.loads,
            missing_entries=self.missing_entries | other.missing_entries,
            shadows=self.shadows + other.shadows,
            corrections=self.corrections + other.corrections,
        )
