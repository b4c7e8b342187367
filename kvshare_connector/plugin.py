"""vLLM general plugin (entry point group ``vllm.general_plugins``).

vLLM never hands the model module to KV connectors, but kvshare's worker-side connector
must run the model's own layers to recompute the tokens it fills. vLLM loads general
plugins in every one of its processes (main, EngineCore, workers), possibly more than
once, before a worker loads its model; so ``register`` wraps the V1 ``Worker.load_model``
(the CPU worker inherits it) once per process to remember the model it loaded.
:func:`loaded_model` then serves it to the connector, which vLLM builds after the load.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

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
        result = original(self, *args, **kwargs)
        _model = self.model_runner.get_model()
        return result

    Worker.load_model = load_model
    logger.debug("kvshare vLLM plugin: wrapped Worker.load_model")


def loaded_model() -> torch.nn.Module:
    """The model this process's vLLM worker loaded; raises if none was (plugin not run)."""
    if _model is None:
        raise RuntimeError(
            "kvshare: no vLLM model was loaded in this process; is the kvshare vLLM plugin "
            "installed (entry point 'vllm.general_plugins': kvshare = kvshare.plugin:register) "
            "and not excluded by VLLM_PLUGINS?"
        )
    return _model
