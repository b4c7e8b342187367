"""Residual add and RMSNorm in one pass, as a Llama/Qwen2 decoder layer's norms compute them.

transformers runs ``residual + update`` and then ``LlamaRMSNorm`` as about ten element-wise
kernels (upcast, square, mean, add, rsqrt, multiply, downcast, weight). For the few rows
that selective recompute tracks per layer those kernels are tiny and the time goes into
launching them, so on a GPU the host, not the device, set the pace. The Triton kernel
does the same arithmetic with the same roundings, one row per program: the sum is
rounded to the model dtype (it is the new residual), normalised in float32, rounded, then
multiplied by the weight in the model dtype. Only the order of the mean's float32 sum
differs from PyTorch's.

:func:`add_rms_norm` runs the kernel on CUDA and :func:`add_rms_norm_reference` (the
transformers arithmetic) elsewhere.
"""

from __future__ import annotations

import torch


def add_rms_norm(update: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, stream)`` for ``stream = residual + update`` (``update`` when ``residual``
    is None); rows ``[n, hidden]``, ``weight`` ``[hidden]``."""
    if update.is_cuda:
        from kvshare.kernels._rms_norm_triton import add_rms_norm_triton

        return add_rms_norm_triton(update, residual, weight, eps)
    return add_rms_norm_reference(update, residual, weight, eps)


def add_rms_norm_reference(update: torch.Tensor, residual: torch.Tensor | None,
                           weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``residual + update`` then ``LlamaRMSNorm.forward``."""
    check_inputs(update, residual, weight)
    stream = update if residual is None else residual + update
    x = stream.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(stream.dtype), stream


def check_inputs(update: torch.Tensor, residual: torch.Tensor | None,
                 weight: torch.Tensor) -> None:
    if update.dim() != 2 or weight.shape != (update.shape[1],):
        raise ValueError(f"update must be [n, hidden] and weight [hidden], got "
                         f"{tuple(update.shape)} and {tuple(weight.shape)}")
    if residual is not None and (residual.shape != update.shape
                                 or residual.dtype != update.dtype):
        raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} must match update "
                         f"{update.dtype} {tuple(update.shape)}")
