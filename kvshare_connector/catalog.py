"""The entry catalog: what the scheduler side of the connector asks of the cache's index.

A :class:`Catalog` looks prompts up (embed, search the scopes the tenancy policy allows,
align, plan), commits the entries whose chunks the tiers hold, drops entries whose
chunks are gone, counts hits and hears load reports. Two implementations:

* :class:`LocalCatalog`, the entry index in this process: the connector's embedded mode
  (one per vLLM instance) and the ``kvshare daemon`` (one per host, for every instance);
* ``kvshare.remote.client.RemoteCatalog``, the same calls sent to the daemon.

One writer per index directory: the LocalCatalog that opened it. LanceDB writes
(flushes, compaction) run on a background thread, so a caller never waits for disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from kvshare.config import KVShareConfig
from kvshare.matching.embedder import Embedder, make_embedder
from kvshare.matching.matcher import LookupResult, Matcher
from kvshare.storage.index import EntryIndex, IndexDamagedError, IndexEntry
from kvshare.tenancy import TenancyPolicy, TenantQuotas

logger = logging.getLogger(__name__)

COMPACT_EVERY_FLUSHES = 64
"""LanceDB compaction (and old-version cleanup) after this many flushes."""


@dataclass(frozen=True)
class LoadOutcome:
    """What one fill did, as the worker reported it (token counts of the claim)."""

    tenant: str
    claimed: int
    reused: int
    """Loaded and not recomputed."""
    recomputed: int
    fallback: bool


class Catalog(Protocol):
    """The scheduler side's view of the cache index (see the module docstring)."""

    def lookup(self, model_id: str, text: str, token_ids: Sequence[int], tenant: str,
               in_flight: Sequence[IndexEntry] = ()) -> LookupResult:
        """Plan the reuse of earlier prompts for this one; ``in_flight`` are entries whose
        chunks are still being written (they compete like indexed ones)."""
        ...

    def commit(self, entries: Sequence[IndexEntry], kv_bytes_per_token: int) -> None:
        """Index entries whose chunks the tiers hold."""
        ...

    def drop(self, entry_ids: Iterable[str]) -> None:
        """Forget entries whose chunks are gone."""
        ...

    def record_hits(self, entry_ids: Iterable[str]) -> None:
        """Count a reuse of each entry (it feeds LRU eviction)."""
        ...

    def report_load(self, outcome: LoadOutcome) -> None:
        """Hear what a fill did (metrics)."""
        ...

    def close(self) -> None:
        ...


class LocalCatalog:
    """An :class:`EntryIndex` with one :class:`Matcher` per model; see the module docstring.

    Thread-safe: lookups may run on several threads while commits arrive (the index
    guards its mirror with its own lock).
    """

    def __init__(self, config: KVShareConfig, embedder: Embedder | None = None, *,
                 read_only: bool = False) -> None:
        """``read_only`` (``kvshare inspect``'s read views beside a live writer): never
        write the index directory, not even the flush an open may find due."""
        self.config = config
        self.read_only = read_only
        self.embedder = embedder or make_embedder(config.embedder, config.embed_max_chars,
                                                  cache_dir=config.home_dir / "wordllama")
        self.index = self._open_index()
        self.policy = TenancyPolicy.from_config(config, state_dir=self.index.path)
        self.quotas = TenantQuotas.from_config(config, state_dir=self.index.path)
        present = self.index.entries()
        self.policy.retain(entry.entry_id for entry in present)
        over_quota = [entry.entry_id for entry in self.quotas.rebuild(present)]
        if over_quota and not read_only:  # the quota was lowered since the index was written
            logger.info("kvshare: dropping %d entries over their tenant's quota",
                        len(over_quota))
            self._delete(over_quota)
        self._matchers: dict[str, Matcher] = {}
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="kvshare-index")
        self._flush_queued: Future | None = None
        self._flushes = 0
        if self.index.needs_flush and not read_only:  # e.g. a large partition to index
            self._queue_flush()

    def _open_index(self) -> EntryIndex:
        """The index, or, where LanceDB cannot read it, a new empty one beside the damaged
        directory, which is moved aside whole (``<index_dir>.damaged-<UTC time>``) for
        inspection, never deleted: a damaged index costs the entries it held (their
        prompts are computed again and stored anew), never a server that does not start.
        ``read_only`` callers change nothing and get the error."""
        def open_index() -> EntryIndex:
            return EntryIndex(self.config.index_dir, self.embedder.dim,
                              ann_min_rows=self.config.ann_index_min_rows,
                              flush_rows=self.config.index_flush_rows,
                              max_entries=self.config.index_max_entries, auto_flush=False)

        try:
            return open_index()
        except IndexDamagedError as exc:
            if self.read_only:
                raise
            aside = exc.path.with_name(
                f"{exc.path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            exc.path.rename(aside)
            logger.error("kvshare: %s; moved it to %s and started an empty index (its "
                         "entries' prompts are computed and stored again)", exc, aside)
            return open_index()

    def matcher(self, model_id: str) -> Matcher:
        matcher = self._matchers.get(model_id)
        if matcher is None:
            matcher = self._matchers[model_id] = Matcher.from_config(
                self.config, self.index, self.embedder, model_id, policy=self.policy)
        return matcher

    # ------------------------------------------------------------------ Catalog
    def lookup(self, model_id: str, text: str, token_ids: Sequence[int], tenant: str,
               in_flight: Sequence[IndexEntry] = ()) -> LookupResult:
        return self.matcher(model_id).lookup(text, token_ids, tenant, extra=in_flight)

    def commit(self, entries: Sequence[IndexEntry], kv_bytes_per_token: int) -> None:
        if not entries:
            return
        evicted = {entry.entry_id for entry in self.index.add(list(entries))}
        if evicted:
            logger.info("kvshare: index at capacity, dropped %d least recently used entries",
                        len(evicted))
            self.quotas.forget(evicted)
            self.policy.forget(evicted)
        # The same objects the index holds: record_hits updates them, and so the quotas' LRU.
        over_quota = [entry.entry_id for entry in self.quotas.admit(
            [entry for entry in entries if entry.entry_id not in evicted], kv_bytes_per_token)]
        if over_quota:
            logger.info("kvshare: dropping %d entries over their tenant's quota",
                        len(over_quota))
            self._delete(over_quota)
        self._queue_flush()

    def drop(self, entry_ids: Iterable[str]) -> None:
        ids = list(entry_ids)
        if ids and self._delete(ids):
            self._queue_flush()

    def _delete(self, entry_ids: list[str]) -> int:
        """Forget entries everywhere: the index, the quotas and the popularity counts."""
        self.quotas.forget(entry_ids)
        self.policy.forget(entry_ids)
        return self.index.delete(entry_ids)

    def record_hits(self, entry_ids: Iterable[str]) -> None:
        self.index.record_hits(entry_ids)

    def report_load(self, outcome: LoadOutcome) -> None:
        """Nothing to do here: the daemon counts the reports it relays in its metrics,
        and an embedded connector's counts go through vLLM's connector stats."""

    def close(self) -> None:
        self._writes.shutdown(wait=True)
        self.index.close()
        self.policy.save()

    # ------------------------------------------------------------------ writes
    def _queue_flush(self) -> None:
        """One LanceDB flush at a time, off the caller's thread; compaction now and then."""
        if self.read_only:
            return
        if self._flush_queued is not None and not self._flush_queued.done():
            return
        self._flush_queued = self._writes.submit(self._flush)

    def _flush(self) -> None:
        try:
            self.index.flush()
            self.policy.save()
            self._flushes += 1
            if self._flushes % COMPACT_EVERY_FLUSHES == 0:
                self.index.compact()
        except Exception:
            logger.exception("kvshare: writing the index failed; entries stay in memory "
                             "and are written with the next flush")


def open_catalog(config: KVShareConfig) -> Catalog:
    """The catalog ``config.mode`` names: the index in this process, or the daemon's."""
    if config.mode == "remote":
        from kvshare.remote.client import RemoteCatalog

        return RemoteCatalog.connect(config)
    return LocalCatalog(config)
