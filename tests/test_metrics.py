"""The daemon's Prometheus metrics: scraped over real HTTP and parsed with
prometheus_client's own parser."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvshare.metrics import OTHER_LABEL, PUBLIC_LABEL, CacheMetrics, TenantLabels
from kvshare.storage.tier import TierStats


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of every sample in ``text``."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def served():
    """A CacheMetrics with live sources, served on a free port; yields (metrics, scrape)."""
    tiers = {"cpu": TierStats("cpu", capacity_bytes=1 << 30, bytes_used=4096, chunks=2,
                              hits=5, misses=1, evictions=3),
             "redis": TierStats("redis", capacity_bytes=None, bytes_used=100, chunks=-1,
                                healthy=False)}
    state = {"entries": 7, "bytes": {"": 10, "acme": 20}}
    metrics = CacheMetrics(2, tier_stats=lambda: tiers, index_entries=lambda: state["entries"],
                           tenant_bytes=lambda: state["bytes"])
    port = _free_port()
    stop = metrics.serve(port)

    def scrape() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            return _samples(reply.read().decode())

    yield metrics, scrape, state
    stop()


def test_counters_move_with_requests_served(served):
    metrics, scrape, _ = served
    before = scrape()
    assert _value(before, "kvshare_lookups_total", tenant="acme", outcome="hit") == 0
    assert _value(before, "kvshare_evictions_total", reason="quota") == 0

    metrics.observe_lookup("acme", 0.002, hit=True)
    metrics.observe_lookup("acme", 0.0004, hit=False)
    metrics.observe_lookup("", 0.03, hit=True)
    metrics.observe_load("acme", claimed=1000, reused=800, recomputed=200, fallback=False)
    metrics.observe_load("acme", claimed=300, reused=0, recomputed=300, fallback=True)
    metrics.observe_eviction("quota", 4)
    after = scrape()

    assert _value(after, "kvshare_lookups_total", tenant="acme", outcome="hit") == 1
    assert _value(after, "kvshare_lookups_total", tenant="acme", outcome="miss") == 1
    assert _value(after, "kvshare_lookups_total", tenant=PUBLIC_LABEL, outcome="hit") == 1
    assert _value(after, "kvshare_claims_total", tenant="acme") == 2
    assert _value(after, "kvshare_claimed_tokens_total", tenant="acme") == 1300
    assert _value(after, "kvshare_reused_tokens_total", tenant="acme") == 800
    assert _value(after, "kvshare_recomputed_tokens_total", tenant="acme") == 500
    assert _value(after, "kvshare_fallbacks_total", tenant="acme") == 1
    assert _value(after, "kvshare_evictions_total", reason="quota") == 4
    assert _value(after, "kvshare_lookup_seconds_count") == 3
    assert _value(after, "kvshare_lookup_seconds_sum") == pytest.approx(0.0324)
    # Cumulative buckets: 0.4 ms and 2 ms fall at or below 2.5 ms, 30 ms does not.
    assert _value(after, "kvshare_lookup_seconds_bucket", le="0.0025") == 2
    assert _value(after, "kvshare_lookup_seconds_bucket", le="0.05") == 3


def test_cache_state_is_read_at_scrape_time(served):
    _, scrape, state = served
    first = scrape()
    assert _value(first, "kvshare_tier_bytes", tier="cpu") == 4096
    assert _value(first, "kvshare_tier_capacity_bytes", tier="cpu") == 1 << 30
    assert _value(first, "kvshare_tier_chunks", tier="cpu") == 2
    assert _value(first, "kvshare_tier_evictions_total", tier="cpu") == 3
    assert _value(first, "kvshare_tier_hits_total", tier="cpu") == 5
    assert _value(first, "kvshare_tier_healthy", tier="redis") == 0
    # Redis manages its own memory and cannot count chunks cheaply: no made-up samples.
    assert ("kvshare_tier_capacity_bytes", (("tier", "redis"),)) not in first
    assert ("kvshare_tier_chunks", (("tier", "redis"),)) not in first
    assert _value(first, "kvshare_index_entries") == 7
    assert _value(first, "kvshare_tenant_bytes", tenant=PUBLIC_LABEL) == 10
    assert _value(first, "kvshare_tenant_bytes", tenant="acme") == 20

    state["entries"] = 9
    assert _value(scrape(), "kvshare_index_entries") == 9


def test_a_failing_source_leaves_the_rest_of_the_scrape(served):
    metrics, scrape, state = served
    state["bytes"] = None  # tenant_bytes() now raises AttributeError on .items()
    metrics.observe_lookup("acme", 0.001, hit=True)
    samples = scrape()
    assert not any(name == "kvshare_tenant_bytes" for name, _ in samples)
    assert _value(samples, "kvshare_index_entries") == 7
    assert _value(samples, "kvshare_lookups_total", tenant="acme", outcome="hit") == 1


def test_tenant_labels_are_bounded():
    metrics = CacheMetrics(2, tenant_bytes=lambda: {f"t{i}": 1 for i in range(5)})
    for i in range(5):
        metrics.observe_lookup(f"t{i}", 0.001, hit=True)
        metrics.observe_load(f"t{i}", claimed=10, reused=10, recomputed=0, fallback=False)
    samples = _samples(metrics.render().decode())
    for name in ("kvshare_lookups_total", "kvshare_reused_tokens_total", "kvshare_tenant_bytes"):
        tenants = {dict(labels)["tenant"] for n, labels in samples if n == name}
        assert tenants == {"t0", "t1", OTHER_LABEL}, name
    assert _value(samples, "kvshare_reused_tokens_total", tenant=OTHER_LABEL) == 30
    assert _value(samples, "kvshare_tenant_bytes", tenant=OTHER_LABEL) == 3


def test_reserved_names_never_mix_a_tenant_into_the_public_scope():
    labels = TenantLabels(max_tenants=5)
    assert labels("") == PUBLIC_LABEL
    assert labels("public") == OTHER_LABEL
    assert labels("other") == OTHER_LABEL
    assert labels("acme") == "acme"
    assert TenantLabels(max_tenants=0)("acme") == OTHER_LABEL


def test_stop_frees_the_port():
    port = _free_port()
    stop = CacheMetrics(1).serve(port)
    stop()
    stop()  # idempotent
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize("call, message", [
    (lambda m: m.observe_eviction("lru"), "'lru' is not one of"),
    (lambda m: m.observe_eviction("quota", -1), "n=-1"),
    (lambda m: m.observe_load("a", claimed=-1, reused=0, recomputed=0, fallback=False),
     "claimed=-1"),
    (lambda m: m.serve(0), "port=0"),
])
def test_bad_input_names_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call(CacheMetrics(1))
