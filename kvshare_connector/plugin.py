"""vLLM general plugin (entry point group ``vllm.general_plugins``).

vLLM loads general plugins in every one of its processes, possibly more than once. The
worker-side connector needs the model module, which vLLM does not hand to connectors;
this plugin is where kvshare will wrap the model runner's ``load_model`` to reach it.
Until the connector lands it only announces itself, idempotently.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Called by vLLM in each process; safe to call repeatedly."""
    global _registered
    if _registered:
        return
    _registered = True
    logger.debug("kvshare vLLM plugin loaded")
