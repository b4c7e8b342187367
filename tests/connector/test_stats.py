"""The connector's stats through vLLM's own stats path, without an engine: vLLM's
EngineCore -> frontend serialisation, its Prometheus logger and its log line."""

from __future__ import annotations

from collections import Counter as Tally

import pytest
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvshare.connector.metadata import LoadReport
from kvshare.connector.stats import (
    COUNTS,
    QUALITY_COUNTS,
    KVShareConnectorStats,
    KVSharePromMetrics,
)


def _report(claimed: int, loaded: int, recomputed: int, *, fallback: bool = False,
            seconds: float = 0.2) -> LoadReport:
    return LoadReport(req_id="r", claimed=claimed, loaded=loaded, recomputed=recomputed,
                      fallback=fallback, seconds=seconds)


def _stats(*reports: LoadReport, failures: int = 0) -> KVShareConnectorStats:
    stats = KVShareConnectorStats()
    for report in reports:
        stats.record(report)
    for _ in range(failures):
        stats.record_failure()
    return stats


def _samples(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def vllm_config():
    """A real VllmConfig naming the connector (no engine is built from it)."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    from kvshare.model_assets import resolve_model_dir

    return EngineArgs(
        model=str(resolve_model_dir("smollm2-135m-instruct")), max_model_len=2048,
        kv_transfer_config=KVTransferConfig(kv_connector="KVShareConnector",
                                            kv_connector_module_path="kvshare.connector",
                                            kv_role="kv_both"),
    ).create_engine_config()


NO_QUALITY = dict.fromkeys(QUALITY_COUNTS, 0)


def test_record_counts_what_load_reports_say():
    stats = _stats(_report(1000, 990, 150, seconds=0.3),
                   _report(200, 0, 200, fallback=True, seconds=0.1), failures=1)
    assert stats.data == {"loads": 2, "claimed_tokens": 1200, "loaded_tokens": 990,
                          "reused_tokens": 850, "recomputed_tokens": 350, "fallbacks": 1,
                          "failed_loads": 1, **NO_QUALITY, "fill_seconds": [0.3, 0.1]}
    assert stats.reduce() == {"loads": 2, "claimed_tokens": 1200, "loaded_tokens": 990,
                              "reused_tokens": 850, "recomputed_tokens": 350, "fallbacks": 1,
                              "failed_loads": 1, **NO_QUALITY, "mean_fill_ms": 200.0}


def test_record_quality_names_the_schedulers_counts():
    """The scheduler half counts checks by outcome, failed checks and gate changes
    (``KVShareScheduler.take_quality_counts``)."""
    stats = KVShareConnectorStats()
    stats.record_quality(Tally({"done": 3, "failed": 1, "dropped": 2, "error": 1,
                                  "closures": 1, "reopenings": 0}))
    assert stats.data == {**dict.fromkeys(COUNTS, 0), "shadow_checks": 3, "shadow_failures": 1,
                          "shadow_dropped": 2, "shadow_errors": 1, "gate_closures": 1,
                          "fill_seconds": []}


@pytest.mark.parametrize("outcome", ["done", "failed", "dropped", "error", "closures",
                                     "reopenings"])
def test_a_quality_count_alone_is_not_empty(outcome):
    """The scheduler half's stats hold only quality counts: vLLM drops empty ones."""
    stats = KVShareConnectorStats()
    stats.record_quality({outcome: 0})
    assert stats.is_empty()
    stats.record_quality({outcome: 1})
    assert not stats.is_empty()


def test_empty_until_a_load_or_failure_and_reset_empties():
    assert KVShareConnectorStats().is_empty()
    assert not _stats(failures=1).is_empty()
    stats = _stats(_report(100, 100, 10))
    assert not stats.is_empty()
    stats.reset()
    assert stats.is_empty() and stats.data["fill_seconds"] == []


def test_aggregate_sums_into_a_new_object():
    """vLLM hands one step's dict to several loggers; aggregating must not change it."""
    first, second = _stats(_report(100, 100, 10)), _stats(_report(50, 40, 20), failures=1)
    second.record_quality({"done": 2, "failed": 1})
    first_data = {**first.data, "fill_seconds": list(first.data["fill_seconds"])}
    total = first.aggregate(second)
    assert total.data["claimed_tokens"] == 150
    assert total.data["reused_tokens"] == 120
    assert total.data["failed_loads"] == 1
    assert (total.data["shadow_checks"], total.data["shadow_failures"]) == (2, 1)
    assert total.data["fill_seconds"] == [0.2, 0.2]
    assert first.data == first_data
    with pytest.raises(TypeError, match="cannot aggregate kvshare stats with"):
        first.aggregate(KVConnectorStats())  # another connector's stats


def test_data_survives_the_engine_core_to_frontend_encoding():
    """SchedulerStats travel from the EngineCore process to the frontend as msgpack."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    data = _stats(_report(1000, 990, 150)).to_dict()
    outputs = EngineCoreOutputs(scheduler_stats=SchedulerStats(kv_connector_stats=data))
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(outputs))
    assert decoded.scheduler_stats.kv_connector_stats == data


def test_prom_metrics_count_per_engine(vllm_config):
    """The metric classes vLLM passes register where they register (here a private
    registry); counts land on the observing engine's labels only."""
    registry = CollectorRegistry()

    def bound(cls):
        class InRegistry(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, registry=registry, **kwargs)
        return InRegistry

    metrics = KVSharePromMetrics(
        vllm_config, {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)},
        ["model_name", "engine"], {0: ["m", "0"], 1: ["m", "1"]})
    metrics.observe(_stats(_report(1000, 990, 150, seconds=0.3)).to_dict(), engine_idx=1)
    metrics.observe(_stats(_report(100, 100, 0, seconds=3.0)).to_dict(), engine_idx=1)
    scheduler_side = KVShareConnectorStats()
    scheduler_side.record_quality({"done": 4, "failed": 3, "closures": 1})
    metrics.observe(scheduler_side.to_dict(), engine_idx=1)
    samples = _samples(registry)
    engine0, engine1 = ((("engine", idx), ("model_name", "m")) for idx in ("0", "1"))
    assert samples[("vllm:kvshare_reused_tokens_total", engine1)] == 950
    assert samples[("vllm:kvshare_loads_total", engine1)] == 2
    assert samples[("vllm:kvshare_reused_tokens_total", engine0)] == 0
    assert samples[("vllm:kvshare_fill_seconds_count", engine1)] == 2
    assert samples[("vllm:kvshare_shadow_checks_total", engine1)] == 4
    assert samples[("vllm:kvshare_shadow_failures_total", engine1)] == 3
    assert samples[("vllm:kvshare_gate_closures_total", engine1)] == 1
    at_most_half_s = tuple(sorted((*engine1, ("le", "0.5"))))
    assert samples[("vllm:kvshare_fill_seconds_bucket", at_most_half_s)] == 1
    assert {key for key, _ in samples if key.endswith("_total")} >= {
        f"vllm:kvshare_{key}_total" for key in COUNTS}


def test_vllm_prometheus_logger_exports_the_connector_counters(vllm_config):
    """vLLM's own Prometheus logger finds the connector's metrics through the connector
    class (``build_prom_metrics``) and serves them from the registry behind /metrics."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.stats import SchedulerStats

    labels = (("engine", "0"), ("model_name", vllm_config.model_config.served_model_name))
    for _ in range(2):  # a second logger in one process replaces the first one's metrics
        logger = PrometheusStatLogger(vllm_config)
        before = _samples(REGISTRY)[("vllm:kvshare_reused_tokens_total", labels)]
        data = _stats(_report(1000, 990, 150), _report(200, 0, 200, fallback=True)).to_dict()
        logger.record(SchedulerStats(kv_connector_stats=data), None)
        logger.record(SchedulerStats(), None)  # a step without loads
        after = _samples(REGISTRY)
        assert before == 0
        assert after[("vllm:kvshare_reused_tokens_total", labels)] == 850
        assert after[("vllm:kvshare_recomputed_tokens_total", labels)] == 350
        assert after[("vllm:kvshare_fallbacks_total", labels)] == 1
        assert after[("vllm:kvshare_fill_seconds_count", labels)] == 2


def test_vllm_log_line_reports_the_interval(vllm_config):
    """vLLM's periodic log line builds the stats through ``build_kv_connector_stats``."""
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging

    logging_ = KVConnectorLogging(vllm_config.kv_transfer_config)
    logging_.observe(_stats(_report(1000, 990, 150, seconds=0.3)).to_dict())
    logging_.observe(_stats(_report(100, 100, 0, seconds=0.1)).to_dict())
    lines = []
    logging_.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    assert lines == ["KV Transfer metrics: loads=2, claimed_tokens=1100, loaded_tokens=1090, "
                     "reused_tokens=950, recomputed_tokens=150, fallbacks=0, failed_loads=0, "
                     "shadow_checks=0, shadow_failures=0, shadow_dropped=0, shadow_errors=0, "
                     "gate_closures=0, gate_reopenings=0, mean_fill_ms=200.0"]
