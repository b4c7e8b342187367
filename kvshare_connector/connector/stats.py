"""The connector's own numbers, exported through vLLM's KV connector stats.

vLLM asks the worker-side connector for a :class:`KVShareConnectorStats` after every
step (``get_kv_connector_stats``), carries its ``data`` dict to the EngineCore, adds the
scheduler side's, and hands it in ``SchedulerStats`` to the frontend's stat loggers:
vLLM's log line ("KV Transfer metrics: ...", from :meth:`~KVShareConnectorStats.reduce`)
and its Prometheus logger, where :class:`KVSharePromMetrics` turns it into counters on
vLLM's own ``/metrics``. vLLM only builds stats when it logs them (``vllm serve`` does,
``LLM(...)`` only with ``disable_log_stats=False``).

``data`` crosses processes (msgpack), so it holds plain numbers and a list of floats.
Token counts follow :class:`~kvshare.connector.metadata.LoadReport`: tokens of the
claims, vLLM's own prefix-cache hits excluded; "reused" means loaded and not recomputed.
The worker half records loads; the scheduler half, which scores shadow checks and runs
the quality gate (:mod:`kvshare.connector.quality_gate`), records their counts.

Metric names start with ``vllm:`` like every metric of vLLM's logger: before a new
Prometheus logger registers its metrics, vLLM unregisters the old logger's by that
prefix, so a process that builds a second engine (tests, a restarted ``AsyncLLM``) would
otherwise fail with duplicated time series.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.v1.metrics.utils import create_metric_per_engine

from kvshare.connector.metadata import LoadReport

LOAD_COUNTS = {
    "loads": "Claims kvshare filled (one per claimed request and load)",
    "claimed_tokens": "Prompt tokens kvshare filled, so vLLM did not compute them",
    "loaded_tokens": "Claimed tokens whose KV came from the tiers",
    "reused_tokens": "Claimed tokens loaded and not recomputed",
    "recomputed_tokens": "Claimed tokens kvshare recomputed (edits, boundaries, missing "
                         "chunks, DHD picks; all of them after a fallback)",
    "fallbacks": "Claims whose selective fill failed and were recomputed in full",
    "failed_loads": "Claims whose full recompute failed too, reported to vLLM as load errors",
}
QUALITY_COUNTS = {
    "shadow_checks": "Shadow checks that compared a fill with full compute",
    "shadow_failures": "Shadow checks whose fill missed the pass criteria (shadow_min_top1, "
                       "shadow_max_kl)",
    "shadow_dropped": "Sampled fills left unchecked because the checker was busy",
    "shadow_errors": "Shadow checks that raised, which say nothing about the fill",
    "gate_closures": "Times the quality gate stopped the claims of the model or of a scope",
    "gate_reopenings": "Times the quality gate let a stopped model or scope claim again",
}
COUNTS = {**LOAD_COUNTS, **QUALITY_COUNTS}
"""``data`` key -> help text of each count; the Prometheus counter is ``vllm:kvshare_<key>``."""
QUALITY_KEYS = {"done": "shadow_checks", "failed": "shadow_failures",
                "dropped": "shadow_dropped", "error": "shadow_errors",
                "closures": "gate_closures", "reopenings": "gate_reopenings"}
"""The scheduler's quality counts (``KVShareScheduler.take_quality_counts``) -> ``data``
keys."""
FILL_SECONDS = "fill_seconds"
"""``data`` key of the list of fill wall times (seconds), one per load."""
FILL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0)
"""Fill time buckets in seconds: milliseconds on a GPU, up to seconds on CPU for long
prompts."""


@dataclass
class KVShareConnectorStats(KVConnectorStats):
    """Counts and fill times of the loads, and the shadow-check and gate counts, since
    the last ``get_kv_connector_stats``.

    ``data``: every key of ``COUNTS`` -> int, ``FILL_SECONDS`` -> list of floats.
    ``aggregate`` returns a new object: vLLM hands the same dict to several loggers.
    """

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {**dict.fromkeys(COUNTS, 0), FILL_SECONDS: []}

    def is_empty(self) -> bool:
        return not any(self.data[key] for key in COUNTS)

    def record(self, report: LoadReport) -> None:
        """One load the worker finished (selectively or by falling back)."""
        data = self.data
        data["loads"] += 1
        data["claimed_tokens"] += report.claimed
        data["loaded_tokens"] += report.loaded
        data["reused_tokens"] += report.reused
        data["recomputed_tokens"] += report.recomputed
        data["fallbacks"] += int(report.fallback)
        data[FILL_SECONDS].append(report.seconds)

    def record_failure(self) -> None:
        """One claim the worker could fill neither selectively nor by recomputing it."""
        self.data["failed_loads"] += 1

    def record_quality(self, counts: Mapping[str, int]) -> None:
        """The scheduler's shadow-check and gate counts (keys of ``QUALITY_KEYS``)."""
        for name, number in counts.items():
            self.data[QUALITY_KEYS[name]] += number

    def aggregate(self, other: KVConnectorStats) -> KVShareConnectorStats:
        if not isinstance(other, KVShareConnectorStats):
            raise TypeError(f"cannot aggregate kvshare stats with {type(other).__name__}")
        merged = {key: self.data[key] + other.data[key] for key in COUNTS}
        merged[FILL_SECONDS] = self.data[FILL_SECONDS] + other.data[FILL_SECONDS]
        return KVShareConnectorStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        """The interval's totals and mean fill time, for vLLM's periodic log line."""
        fills = self.data[FILL_SECONDS]
        summary: dict[str, int | float] = {key: self.data[key] for key in COUNTS}
        summary["mean_fill_ms"] = round(1e3 * sum(fills) / len(fills), 1) if fills else 0.0
        return summary


class KVSharePromMetrics(KVConnectorPromMetrics):
    """kvshare's counters and fill-time histogram on vLLM's ``/metrics``, labelled with
    vLLM's per-engine labels (``model_name``, ``engine``)."""

    def __init__(self, vllm_config: VllmConfig,
                 metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]
                 ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counts: dict[str, dict[int, Counter]] = {
            key: create_metric_per_engine(
                self._counter_cls(name=f"vllm:kvshare_{key}", documentation=documentation,
                                  labelnames=labelnames),
                per_engine_labelvalues)
            for key, documentation in COUNTS.items()
        }
        self._fill_seconds: dict[int, Histogram] = create_metric_per_engine(
            self._histogram_cls(name="vllm:kvshare_fill_seconds",
                                documentation="Worker wall time of a fill: load, re-rotation, "
                                              "selective recompute, writes",
                                labelnames=labelnames, buckets=list(FILL_BUCKETS_S)),
            per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        """Add one step's stats (all workers' and the scheduler's, summed by vLLM)."""
        for key, counters in self._counts.items():
            counters[engine_idx].inc(transfer_stats_data[key])
        histogram = self._fill_seconds[engine_idx]
        for seconds in transfer_stats_data[FILL_SECONDS]:
            histogram.observe(seconds)
