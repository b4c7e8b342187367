"""vLLM general plugin (entry point group ``vllm.general_plugins``).

vLLM never hands the model module to KV connectors, but kvshare's worker-side connector
must run the model's own layers to recompute the tokens it fills. vLLM loads general
plugins in every one of its processes (main, EngineCore, workers), possibly more than
once, before a worker loads its model; so ``register`` wraps the V1 ``Worker.load_model``
(the CPU worker inherits it) once per process to remember the model it loaded.
:func:`loaded_model` then serves it to the connector, which vLLM builds after the load.

The same wrapper bounds oneDNN's kernel cache before the load when the worker runs
kvshare's connector (:func:`bound_gemm_kernel_cache`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")
ONEDNN_CACHE_CAPACITY = 64
"""oneDNN primitives a kvshare worker keeps (oneDNN's default: 1,024).

vLLM's CPU linear layers run oneDNN matmuls, and oneDNN caches one primitive per shape,
row count included, with memory that grows with the rows. Every distinct prefill
length, chunk or fill selection adds primitives. Measured on vanilla vLLM (no
connector, one prompt at a time): 400 prompts of distinct lengths from 20 to 1,217
tokens grew the worker's anonymous memory from 1.27 to 3.2 GB (600 up to 1,817 tokens:
5.5 GB), and the same lengths again added nothing. A fill runs rows of other counts
again (the check layers' positions, DHD's selection), so a serving worker grew for as
long as it ran (the soak: +25% in 25 minutes). With 64 primitives (16 row counts of
SmolLM2's four linear shapes) the same 400 lengths ended at 1.61 GB (1.43 GB after
repeating 100 of them); with 8, at 1.57 GB: the cap, not its size, is what matters."""

_registered = False
_model: torch.nn.Module | None = None


def register() -> None:
    """Called by vLLM in each process; safe to call repeatedly."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.v1.worker.gpu_worker import Worker

    original = Worker.load_model

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        global _model
        bound_gemm_kernel_cache(self.vllm_config)
        result = original(self, *args, **kwargs)
        _model = self.model_runner.get_model()
        return result

    Worker.load_model = load_model
    logger.debug("kvshare vLLM plugin: wrapped Worker.load_model")


def bound_gemm_kernel_cache(vllm_config: Any, environ: dict[str, str] | None = None) -> bool:
    """Cap oneDNN's primitive cache at :data:`ONEDNN_CACHE_CAPACITY` in a worker that runs
    kvshare's connector, unless the user set a capacity. oneDNN reads the variable when
    it first builds a primitive, which is when the model's linear layers are prepared,
    hence before the load. Returns whether it set the cap."""
    environ = os.environ if environ is None else environ
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    if transfer is None or any(name in environ for name in ONEDNN_CACHE_VARIABLES):
        return False
    from kvshare.connector import KVShareConnector

    if transfer.kv_connector != KVShareConnector.__name__:
        return False
    environ[ONEDNN_CACHE_VARIABLES[0]] = str(ONEDNN_CACHE_CAPACITY)
    logger.info("kvshare: oneDNN primitive cache capped at %d (%s)", ONEDNN_CACHE_CAPACITY,
                ONEDNN_CACHE_VARIABLES[0])
    return True


def loaded_model() -> torch.nn.Module:
    """The model this process's vLLM worker loaded; raises if none was (plugin not run)."""
    if _model is None:
        raise RuntimeError(
            "kvshare: no vLLM model was loaded in this process; is the kvshare vLLM plugin "
            "installed (entry point 'vllm.general_plugins': kvshare = kvshare.plugin:register) "
            "and not excluded by VLLM_PLUGINS?"
        )
    return _model
