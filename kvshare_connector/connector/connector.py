"""``KVShareConnector``: vLLM's KV connector API, delegating to one half per role.

vLLM builds the connector twice: with ``role=SCHEDULER`` in the EngineCore process
(:class:`~kvshare.connector.scheduler.KVShareScheduler`: lookups, claims, index) and
with ``role=WORKER`` in each worker (:class:`~kvshare.connector.worker.KVShareWorker`:
tiers, loads, recompute, saves). The halves share only the pickled per-step metadata
(:mod:`kvshare.connector.metadata`) and the tiers' content-addressed chunk keys.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.core.sched.output import SchedulerOutput

from kvshare.config import ConfigError, KVShareConfig
from kvshare.connector.metadata import KVShareConnectorMetadata, KVShareWorkerMetadata
from kvshare.connector.stats import KVShareConnectorStats, KVSharePromMetrics
from kvshare.model_identity import local_model_dir, model_fingerprint

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvshare.connector.scheduler import KVShareScheduler

logger = logging.getLogger(__name__)


def load_config(vllm_config: VllmConfig) -> KVShareConfig:
    """Defaults < YAML (``KVSHARE_CONFIG``) < ``kv_connector_extra_config`` < ``KVSHARE_*``."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    return KVShareConfig.load(overrides=extra)


def check_vllm_config(config: KVShareConfig, vllm_config: VllmConfig) -> None:
    """Refuse setups where kvshare would be wrong rather than slow; errors name the flag."""
    if config.strict_prefix_cache and vllm_config.cache_config.enable_prefix_caching:
        raise ConfigError(
            "kvshare strict_prefix_cache=true keeps approximate KV out of vLLM's exact-prefix "
            "cache, but vLLM runs with prefix caching enabled; start vLLM with "
            "--no-enable-prefix-caching (LLM(enable_prefix_caching=False)) or set "
            "strict_prefix_cache=false"
        )
    if vllm_config.cache_config.cache_dtype != "auto":
        raise ConfigError(
            f"kvshare stores KV in the model dtype, but vLLM runs with kv_cache_dtype="
            f"{vllm_config.cache_config.cache_dtype!r}; start vLLM with --kv-cache-dtype auto")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise ConfigError(
            f"kvshare supports tensor_parallel_size=1 and pipeline_parallel_size=1, got "
            f"{parallel.tensor_parallel_size} and {parallel.pipeline_parallel_size}"
        )
    if vllm_config.kv_transfer_config.kv_load_failure_policy != "recompute":
        logger.warning(
            "kvshare: kv_load_failure_policy=%r fails a request whose fill could not be "
            "recomputed either; 'recompute' lets vLLM prefill it instead",
            vllm_config.kv_transfer_config.kv_load_failure_policy)


def check_model_architecture(model_config: ModelConfig) -> None:
    """Refuse, at start-up, a model whose KV kvshare cannot recompute (rather than fail at
    the worker's first hook); the error names its architecture. What counts is the model
    class vLLM loads for it: several architectures run as one class."""
    from vllm.model_executor.models.registry import ModelRegistry

    from kvshare.recompute.vllm_adapter import SUPPORTED_ARCHITECTURES

    architecture = model_config.architecture
    model_class = getattr(ModelRegistry.models.get(architecture), "class_name", architecture)
    if model_class not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"kvshare cannot reuse the KV of a {architecture} model (vLLM model class "
            f"{model_class}): its selective recompute supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}; serve this model without the kvshare "
            "connector")


def kv_bytes_per_token(vllm_config: VllmConfig) -> int:
    """Bytes of K and V one prompt token holds over all layers (what a stored token costs)."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    return (2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel)
            * model.get_head_size() * model.dtype.itemsize)


class KVShareConnector(KVConnectorBase_V1):
    """Reuse the KV of similar earlier prompts; see docs/connector.md."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = load_config(vllm_config)
        check_vllm_config(config, vllm_config)
        model_config = vllm_config.model_config
        check_model_architecture(model_config)
        model_dir = local_model_dir(model_config.model, model_config.revision)
        model_id = model_fingerprint(model_dir, config.home_dir)
        self._scheduler = self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from kvshare.catalog import open_catalog
            from kvshare.connector.scheduler import KVShareScheduler

            block_size = vllm_config.cache_config.block_size
            self._scheduler = KVShareScheduler(
                config, model_id, vllm_config.model_config.tokenizer, open_catalog(config),
                hash_block_size=(kv_cache_config.hash_block_size if kv_cache_config
                                 and kv_cache_config.hash_block_size else block_size),
                num_kv_blocks=kv_cache_config.num_blocks if kv_cache_config else 1 << 16,
                kv_bytes_per_token=kv_bytes_per_token(vllm_config),
                step_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
                num_layers=model_config.get_num_layers(vllm_config.parallel_config))
        else:
            from kvshare.connector.worker import KVShareWorker

            self._worker = KVShareWorker(config, model_id, model_dir)

    @property
    def claims(self) -> KVShareScheduler | None:
        """The scheduler half (in the EngineCore process; None in workers), for
        :mod:`kvshare.scheduler`."""
        return self._scheduler

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache, not a hand-off: a dropped save is a future miss."""
        return False

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Also the worker's first hook of a step, before vLLM writes any block."""
        super().bind_connector_metadata(connector_metadata)
        self._worker.begin_step(self._metadata())

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker.start_load_kv(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: vLLM computes a claimed request only once its fill has
        ended (a synchronous fill ends in ``start_load_kv``)."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        """Saves read whole prompts from the blocks after the forward (``wait_for_save``)."""

    def wait_for_save(self) -> None:
        self._worker.wait_for_save(self._metadata())

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        """Held requests whose save is answered, and requests loaded asynchronously whose
        fill ended (or that finished during it)."""
        return (self._worker.get_finished(finished_req_ids),
                self._worker.finished_loads(finished_req_ids))

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVShareWorkerMetadata | None:
        return self._worker.build_connector_worker_meta()

    def get_kv_connector_stats(self) -> KVShareConnectorStats | None:
        """What happened since vLLM last asked (after every step), or None when nothing did.

        vLLM asks both halves and adds the scheduler's stats to the worker's: the worker
        half answers its loads, the scheduler half its shadow-check and quality-gate
        counts (it scores the checks and opens and closes the gate).
        """
        if self._worker is not None:
            return self._worker.get_kv_connector_stats()
        stats = KVShareConnectorStats()
        stats.record_quality(self._scheduler.take_quality_counts())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVShareConnectorStats:
        """The stats rebuilt from their ``data`` by vLLM's stat loggers (frontend)."""
        return KVShareConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig,
                           metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> KVSharePromMetrics:
        """kvshare's counters on vLLM's ``/metrics`` (see :mod:`kvshare.connector.stats`)."""
        return KVSharePromMetrics(vllm_config, metric_types, labelnames,
                                  per_engine_labelvalues)

    def _metadata(self) -> KVShareConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVShareConnectorMetadata)
        return meta

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        """``None`` while the request's lookup runs in the background (or the fills in
        flight are at their cap): vLLM asks again. With ``fill_mode: async`` a claim is
        loaded asynchronously: the request waits, holding its blocks, while its fill
        advances a slice per step (see :mod:`kvshare.connector.fill_progress`)."""
        matched = self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        return matched, bool(matched) and self._scheduler.loads_async(request.request_id)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, num_external_tokens,
                                                 blocks.get_block_ids()[0])

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        """Decode corrections read the requests' block ids and their ref counts here."""
        super().bind_kv_cache_manager(kv_cache_manager)
        self._scheduler.corrections.kv_cache_manager = kv_cache_manager

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        self._scheduler.update_connector_output(
            meta if isinstance(meta, KVShareWorkerMetadata) else None)
        self._scheduler.loads_finished(connector_output.finished_recving or ())

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        delay_free = self._scheduler.delays_free(request.request_id)
        return delay_free, self._scheduler.request_finished(request)

    def shutdown(self) -> None:
        for half in (self._scheduler, self._worker):
            if half is not None:
                half.shutdown()
