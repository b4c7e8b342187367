"""Selective recompute of reused K/V: model adapters, RoPE re-rotation, the DHD engine.

Independent of vLLM and of the storage tiers, so it also drives a plain transformers
model (GPU benchmarks, tests). See ``docs/recompute.md``.
"""

from kvshare.recompute.adapter import ModelAdapter
from kvshare.recompute.engine import (
    MassBudget,
    PromptKV,
    RecomputeResult,
    SelectiveRecomputeEngine,
)
from kvshare.recompute.rope import rerotate_keys

__all__ = [
    "MassBudget",
    "ModelAdapter",
    "PromptKV",
    "RecomputeResult",
    "SelectiveRecomputeEngine",
    "rerotate_keys",
]
