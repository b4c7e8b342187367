"""Lookup: embed a prompt, fetch its nearest entries in scope, align, and plan reuse.

This is the scheduler-side decision the connector makes once per request, and the
``kvshare`` policy of ``kvshare bench hitrate``. It only reads token ids and vectors;
whether the planned KV can still be loaded is the loader's business (missing chunks
become recompute).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvshare.config import KVShareConfig
from kvshare.matching.align import plan_reuse
from kvshare.matching.chunk_plan import plan_chunk_reuse
from kvshare.matching.embedder import Embedder
from kvshare.matching.plan import Candidate, ReusePlan
from kvshare.storage.index import EntryIndex, IndexEntry, SearchHit, new_entry_id
from kvshare.tenancy import PUBLIC_SCOPE, TenancyPolicy


@dataclass
class LookupResult:
    plan: ReusePlan
    hits: list[SearchHit]
    """Entries that were aligned against, in the order the planner saw them: by
    approximation depth (exact entries first), nearest first within a depth."""
    embedding: np.ndarray
    """The prompt's embedding, kept so that storing the prompt need not embed it again."""
    embed_ms: float
    search_ms: float
    align_ms: float

    @property
    def total_ms(self) -> float:
        return self.embed_ms + self.search_ms + self.align_ms

    @property
    def entries(self) -> dict[str, IndexEntry]:
        """The hits' entries by id (what the plan's runs name)."""
        return {hit.entry.entry_id: hit.entry for hit in self.hits}


class Matcher:
    """Retrieval + alignment over one :class:`EntryIndex` for one model.

    Which entries a tenant's lookup may reuse is its ``policy``'s decision
    (``kvshare.tenancy``); entries it may not reuse never reach the plan or
    ``LookupResult.hits``.
    """

    def __init__(
        self,
        index: EntryIndex,
        embedder: Embedder,
        model_id: str,
        *,
        policy: TenancyPolicy | None = None,
        top_k: int = 8,
        min_run_tokens: int = 8,
        planner: str = "align",
        chunk_tokens: int = 256,
    ) -> None:
        if planner not in ("align", "chunk256"):
            raise ValueError(f"planner {planner!r} is not one of align, chunk256")
        self.index = index
        self.embedder = embedder
        self.model_id = model_id
        self.policy = policy or TenancyPolicy()
        """Default: ``isolated``, sharing the public scope."""
        self.top_k = top_k
        self.min_run_tokens = min_run_tokens
        self.planner = planner
        self.chunk_tokens = chunk_tokens

    @classmethod
    def from_config(cls, config: KVShareConfig, index: EntryIndex, embedder: Embedder,
                    model_id: str, policy: TenancyPolicy | None = None) -> Matcher:
        """A matcher as configured. Matchers of one index (one per model) must share one
        ``policy``; without one, the configured policy is built with its state beside
        ``index``."""
        if policy is None:
            policy = TenancyPolicy.from_config(config, state_dir=index.path)
        return cls(index, embedder, model_id, policy=policy, top_k=config.top_k,
                   min_run_tokens=config.min_run_tokens, planner=config.planner,
                   chunk_tokens=config.chunk_tokens)

    def lookup(self, text: str, token_ids: Sequence[int], tenant: str = PUBLIC_SCOPE,
               extra: Sequence[IndexEntry] = ()) -> LookupResult:
        """Embed, search what the tenant may reuse, align, plan.

        ``extra`` are entries not in the index yet (the connector's saves in flight); those
        the tenant may reuse compete with the index's hits by distance, so a caller can
        see that the best plan would read from an entry that is still being stored.

        The ``top_k`` nearest entries are offered to the planner exact ones first (by
        ``IndexEntry.depth``): the planner lets earlier candidates win ties, so where an
        exactly computed entry covers as many tokens as an approximate one, its KV is read.

        Under a policy that ``searches_every_scope`` (``popular``), the ``top_k`` nearest
        entries of every scope are searched as well: the popular ones among them compete
        like the tenant's own, and the others are aligned one by one only to count this
        tenant for them (``TenancyPolicy.observe_lookup``); that time is in ``search_ms``.
        """
        t0 = time.perf_counter()
        embedding = self.embedder.embed([text])[0]
        t1 = time.perf_counter()
        hits = self.index.search(embedding, self.model_id, self.policy.scopes(tenant),
                                 self.top_k)
        if self.policy.searches_every_scope:
            hits += self._popular_hits(embedding, token_ids, tenant,
                                       {hit.entry.entry_id for hit in hits})
        # An entry in flight may have reached the index since the caller listed it.
        found = {hit.entry.entry_id for hit in hits}
        hits += [SearchHit(entry, 1.0 - float(entry.embedding @ embedding)) for entry in extra
                 if entry.model_id == self.model_id and entry.entry_id not in found
                 and self.policy.visible(entry, tenant)]
        hits = sorted(hits, key=lambda hit: hit.distance)[: self.top_k]
        hits = sorted(hits, key=lambda hit: (hit.entry.depth, hit.distance))
        t2 = time.perf_counter()
        candidates = [Candidate(hit.entry.entry_id, hit.entry.token_ids) for hit in hits]
        if self.planner == "chunk256":
            plan = plan_chunk_reuse(token_ids, candidates, chunk_tokens=self.chunk_tokens)
        else:
            plan = plan_reuse(token_ids, candidates, min_run_tokens=self.min_run_tokens)
        t3 = time.perf_counter()
        return LookupResult(plan, hits, embedding, (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                            (t3 - t2) * 1e3)

    def _popular_hits(self, embedding: np.ndarray, token_ids: Sequence[int], tenant: str,
                      found: set[str]) -> list[SearchHit]:
        """The popular entries among the ``top_k`` nearest of every scope that the
        tenant's own search did not return; counts the tenant for the rest."""
        popular: list[SearchHit] = []
        hidden: list[IndexEntry] = []
        for hit in self.index.search(embedding, self.model_id, None, self.top_k):
            if hit.entry.entry_id in found:
                continue
            if self.policy.visible(hit.entry, tenant):
                popular.append(hit)
            else:
                hidden.append(hit.entry)
        self.policy.observe_lookup(tenant, token_ids, hidden,
                                   min_run_tokens=self.min_run_tokens)
        return popular

    def insert(
        self,
        text: str,
        token_ids: Sequence[int],
        tenant: str = PUBLIC_SCOPE,
        *,
        embedding: np.ndarray | None = None,
        chunk_keys: Sequence[str] = (),
        entry_id: str | None = None,
        depth: int = 0,
        exact_tokens: int | None = None,
    ) -> IndexEntry:
        """Index a prompt (its chunks must already be stored: entries never point at nothing).

        ``depth`` is the approximation depth of its stored KV (0: computed exactly) and
        ``exact_tokens`` how many leading tokens of it are exact (None: all).
        """
        if embedding is None:
            embedding = self.embedder.embed([text])[0]
        entry = IndexEntry(
            entry_id=entry_id or new_entry_id(),
            model_id=self.model_id,
            scope=tenant,
            embedding=embedding,
            token_ids=np.asarray(token_ids, np.int32),
            text_preview=text,
            chunk_keys=list(chunk_keys),
            depth=depth,
            exact_tokens=exact_tokens,
        )
        self.index.add([entry])
        return entry
