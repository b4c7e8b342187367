"""Comparison helpers shared by the kernel tests."""

from __future__ import annotations

import torch


def rel_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """||out - reference|| / ||reference|| in float64; a NaN anywhere fails every bound."""
    diff = (out.double() - reference.double()).norm()
    return float(diff / reference.double().norm())
