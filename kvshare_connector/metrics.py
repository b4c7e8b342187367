"""Prometheus metrics of the shared cache, served by ``kvshare daemon`` on ``/metrics``.

:class:`CacheMetrics` keeps its own ``CollectorRegistry`` (never prometheus_client's
global one, which vLLM fills in the same process): counters the daemon moves as it
serves calls, a lookup-latency histogram, and gauges read from the cache at scrape time.

Label cardinality is bounded. Tenants are request salts, chosen by clients, so each of
the first ``max_tenants`` distinct tenants gets its own ``tenant`` label and every later
one is counted as ``other``; the public scope is ``public``. A salted tenant literally
named ``public`` or ``other`` is counted as ``other``, so neither label ever mixes the
public scope with a tenant. Every other label (``tier``, ``reason``, ``outcome``) takes
values from a fixed set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from kvshare.storage.tier import TierStats

logger = logging.getLogger(__name__)

PUBLIC_LABEL = "public"
"""``tenant`` label of the public scope (requests without a ``cache_salt``)."""
OTHER_LABEL = "other"
"""``tenant`` label of every tenant beyond the first ``max_tenants``."""
EVICTION_REASONS = ("quota", "capacity", "missing_chunks", "admin")
"""Why index entries leave: a tenant's byte quota, the index capacity, chunks the tiers
lost, an operator's request."""
LOOKUP_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0)
"""Lookup latency buckets in seconds: a mirror search takes well under a millisecond, a
lookup with embedding and alignment a few milliseconds, one past 1 s is given up."""


class TenantLabels:
    """Maps tenants to at most ``max_tenants + 2`` label values (with ``public``, ``other``).

    A tenant keeps the label it got first for the life of the process, so a series never
    changes meaning. Thread-safe: the daemon's call threads and scrapes share it.
    """

    def __init__(self, max_tenants: int) -> None:
        if max_tenants < 0:
            raise ValueError(f"max_tenants={max_tenants} must be >= 0")
        self.max_tenants = max_tenants
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str) -> str:
        if not tenant:
            return PUBLIC_LABEL
        if tenant in (PUBLIC_LABEL, OTHER_LABEL):
            return OTHER_LABEL
        with self._lock:
            if tenant in self._named:
                return tenant
            if len(self._named) < self.max_tenants:
                self._named.add(tenant)
                return tenant
        return OTHER_LABEL


class _CacheStateCollector(Collector):
    """Gauges and tier counters read from the cache at scrape time.

    A source that raises is left out of that scrape (and logged): one failing backend
    must not hide every other metric.
    """

    def __init__(self, labels: TenantLabels,
                 tier_stats: Callable[[], Mapping[str, TierStats]] | None,
                 index_entries: Callable[[], int] | None,
                 tenant_bytes: Callable[[], Mapping[str, int]] | None) -> None:
        self._labels = labels
        self._sources: list[Callable[[], Iterator[Metric]]] = []
        if tier_stats is not None:
            self._sources.append(lambda: _tier_metrics(tier_stats()))
        if index_entries is not None:
            self._sources.append(lambda: _index_metrics(index_entries()))
        if tenant_bytes is not None:
            self._sources.append(lambda: self._tenant_bytes_metrics(tenant_bytes()))

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            try:
                metrics = list(source())
            except Exception:
                logger.warning("kvshare metrics: reading the cache state failed; leaving it "
                               "out of this scrape", exc_info=True)
                continue
            yield from metrics

    def _tenant_bytes_metrics(self, by_tenant: Mapping[str, int]) -> Iterator[Metric]:
        totals: dict[str, int] = {}
        for tenant, nbytes in by_tenant.items():
            label = self._labels(tenant)
            totals[label] = totals.get(label, 0) + nbytes
        family = GaugeMetricFamily("kvshare_tenant_bytes",
                                   "KV bytes held by each tenant's index entries",
                                   labels=["tenant"])
        for label, nbytes in sorted(totals.items()):
            family.add_metric([label], nbytes)
        yield family


def _index_metrics(entries: int) -> Iterator[Metric]:
    yield GaugeMetricFamily("kvshare_index_entries", "Entries in the index", value=entries)


_TIER_COUNTERS = (
    ("hits", "kvshare_tier_hits", "Chunks a get found"),
    ("misses", "kvshare_tier_misses", "Chunks a get did not find"),
    ("stored", "kvshare_tier_stored_chunks", "Chunks accepted by put"),
    ("rejected", "kvshare_tier_rejected_chunks", "Chunks put refused or failed to store"),
    ("evictions", "kvshare_tier_evictions", "Chunks evicted to stay under capacity"),
    ("corrupt", "kvshare_tier_corrupt_chunks", "Chunks that failed verification on read"),
    ("errors", "kvshare_tier_errors", "Backend failures, each turned into misses or not stored"),
    ("get_calls", "kvshare_tier_get_calls", "Batched get calls"),
    ("get_seconds", "kvshare_tier_get_seconds", "Seconds spent in get calls"),
    ("put_calls", "kvshare_tier_put_calls", "Batched put calls"),
    ("put_seconds", "kvshare_tier_put_seconds", "Seconds spent in put calls"),
)
"""(TierStats field, metric name without ``_total``, help) of the cumulative tier counts."""


def _tier_metrics(stats: Mapping[str, TierStats]) -> Iterator[Metric]:
    used = GaugeMetricFamily("kvshare_tier_bytes", "Bytes held by the tier", labels=["tier"])
    capacity = GaugeMetricFamily(
        "kvshare_tier_capacity_bytes",
        "Byte cap the tier evicts to stay under (absent where the backend manages it)",
        labels=["tier"])
    chunks = GaugeMetricFamily(
        "kvshare_tier_chunks", "Chunks held by the tier (absent where the backend cannot "
        "tell cheaply)", labels=["tier"])
    healthy = GaugeMetricFamily("kvshare_tier_healthy",
                                "1 while the tier's backend answers, 0 after a failure",
                                labels=["tier"])
    counters = [(field, CounterMetricFamily(name, help_text, labels=["tier"]))
                for field, name, help_text in _TIER_COUNTERS]
    for name, tier in stats.items():
        used.add_metric([name], tier.bytes_used)
        if tier.capacity_bytes is not None:
            capacity.add_metric([name], tier.capacity_bytes)
        if tier.chunks >= 0:
            chunks.add_metric([name], tier.chunks)
        healthy.add_metric([name], 1 if tier.healthy else 0)
        for field, family in counters:
            family.add_metric([name], getattr(tier, field))
    yield from (used, capacity, chunks, healthy)
    yield from (family for _, family in counters)


class CacheMetrics:
    """The daemon's metrics: per-tenant request counters, lookup latency, cache state.

    Counts are tokens where the name says tokens; ``reused`` means loaded and not
    recomputed, as everywhere in kvshare. The callables are read at scrape time, from the
    HTTP server's thread, so they must be thread-safe.
    """

    def __init__(self, max_tenants: int, *,
                 tier_stats: Callable[[], Mapping[str, TierStats]] | None = None,
                 index_entries: Callable[[], int] | None = None,
                 tenant_bytes: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.tenant_label = TenantLabels(max_tenants)
        counter = self._counter
        self._lookups = counter("kvshare_lookups", "Lookups, by whether the plan reuses "
                                "anything (hit) or not (miss)", ["tenant", "outcome"])
        self._claims = counter("kvshare_claims", "Fills of claimed tokens reported by vLLM "
                               "instances", ["tenant"])
        self._claimed = counter("kvshare_claimed_tokens", "Prompt tokens kvshare filled, so "
                                "vLLM did not compute them", ["tenant"])
        self._reused = counter("kvshare_reused_tokens", "Claimed tokens loaded and not "
                               "recomputed", ["tenant"])
        self._recomputed = counter("kvshare_recomputed_tokens", "Claimed tokens kvshare "
                                   "recomputed", ["tenant"])
        self._fallbacks = counter("kvshare_fallbacks", "Claims whose selective fill failed "
                                  "and was recomputed in full", ["tenant"])
        self._evictions = counter("kvshare_evictions", "Index entries removed, by reason",
                                  ["reason"])
        for reason in EVICTION_REASONS:  # every reason reads 0 before its first eviction
            self._evictions.labels(reason)
        self._lookup_seconds = Histogram(
            "kvshare_lookup_seconds", "Lookup latency: embed, search, align, plan",
            buckets=LOOKUP_BUCKETS_S, registry=self.registry)
        self.registry.register(
            _CacheStateCollector(self.tenant_label, tier_stats, index_entries, tenant_bytes))

    def _counter(self, name: str, documentation: str, labels: list[str]) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    # ------------------------------------------------------------------ observations
    def observe_lookup(self, tenant: str, seconds: float, hit: bool) -> None:
        """One lookup of ``tenant``; ``hit`` when its plan reuses at least one token."""
        self._lookups.labels(self.tenant_label(tenant), "hit" if hit else "miss").inc()
        self._lookup_seconds.observe(seconds)

    def observe_load(self, tenant: str, claimed: int, reused: int, recomputed: int,
                     fallback: bool) -> None:
        """One fill a vLLM instance reported (its ``LoadReport``): token counts of the claim,
        ``reused + recomputed == claimed``."""
        if min(claimed, reused, recomputed) < 0:
            raise ValueError(f"token counts must be >= 0, got claimed={claimed}, "
                             f"reused={reused}, recomputed={recomputed}")
        label = self.tenant_label(tenant)
        self._claims.labels(label).inc()
        self._claimed.labels(label).inc(claimed)
        self._reused.labels(label).inc(reused)
        self._recomputed.labels(label).inc(recomputed)
        if fallback:
            self._fallbacks.labels(label).inc()

    def observe_eviction(self, reason: str, n: int = 1) -> None:
        """``n`` index entries removed for ``reason`` (one of ``EVICTION_REASONS``)."""
        if reason not in EVICTION_REASONS:
            raise ValueError(f"eviction reason {reason!r} is not one of {EVICTION_REASONS}")
        if n < 0:
            raise ValueError(f"evicted entries n={n} must be >= 0")
        self._evictions.labels(reason).inc(n)

    # ------------------------------------------------------------------ export
    def render(self) -> bytes:
        """The registry in Prometheus' text format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)

    def serve(self, port: int) -> Callable[[], None]:
        """Serve ``/metrics`` on ``127.0.0.1:port`` from a daemon thread.

        Returns the function that stops the server and frees the port (idempotent).
        """
        if not 0 < port <= 65535:
            raise ValueError(f"metrics port={port} must be in [1, 65535]")
        server, thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        return lambda: _stop(server, thread)


def _stop(server: WSGIServer, thread: threading.Thread) -> None:
    if thread.is_alive():
        server.shutdown()
        thread.join()
    server.server_close()
