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

    Invariant: ``num_computed + num_claimed == len(token_ids) - 1``: vLLM computes the
    last prompt token itself. Positions below ``num_computed`` are vLLM's own prefix-cache
    hit (exact KV already in the request's blocks): read, never written.
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

    @property
    def end(self) -> int:
        """One past the last claimed position (= prompt length - 1)."""
        return self.num_computed + self.num_claimed


@dataclass
class SaveSpec:
    """After this step the request's whole prompt KV is in its blocks: store it as chunks."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class KVShareConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one per engine step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class LoadReport:
    """How one claim was filled (for logs, tests and benchmarks)."""

    req_id: str
    claimed: int
    loaded: int
    """Claimed tokens whose KV came from the tiers (after the availability mask)."""
    recomputed: int
    """Claimed tokens tracked through the last layer (placeholders + DHD picks)."""
    fallback: bool
    """True when the selective path failed and the claim was fully recomputed."""
    seconds: float
    """Wall time of the worker's load + re-rotation + selective recompute + writes."""
    load_seconds: float = 0.0
    """The part of ``seconds`` spent fetching source chunks and re-rotating their keys."""
    sources: int = 0
    """Source entries the plan's runs copy KV from."""

    def as_dict(self) -> dict[str, float | int | bool]:
        return {name: value for name, value in vars(self).items() if name != "req_id"}


@dataclass
class KVShareWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, one per engine step (aggregated over workers)."""

    stored: dict[str, list[str]] = field(default_factory=dict)
    """Request id -> hex chunk keys now held by the tiers (all of the prompt's chunks)."""
    not_stored: set[str] = field(default_factory=set)
    """Requests whose chunks could not all be stored; their entries are not committed."""
    loads: list[LoadReport] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVShareWorkerMetadata)
        return KVShareWorkerMetadata(
            stored={**self.stored, **other.stored},
            not_stored=self.not_stored | other.not_stored,
            loads=self.loads + other.loads,
        )
