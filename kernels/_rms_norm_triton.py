"""Triton kernel of :func:`kvshare.kernels.rms_norm.add_rms_norm`: one row per program."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvshare.kernels.rms_norm import check_inputs


@triton.jit
def _add_rms_norm_kernel(update, residual, weight, normed, stream, hidden, eps,
                         s_update, s_residual, s_normed, s_stream,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(update + row * s_update + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual + row * s_residual + cols, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)  # the new residual, rounded
        tl.store(stream + row * s_stream + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / hidden
    y = (xf * tl.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(weight + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(normed.dtype.element_ty)
    tl.store(normed + row * s_normed + cols, out, mask=mask)


def add_rms_norm_triton(update: torch.Tensor, residual: torch.Tensor | None,
                        weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on the current stream (arguments as in ``add_rms_norm``)."""
    check_inputs(update, residual, weight)
    for name, t in (("update", update), ("residual", residual), ("weight", weight)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    rows, hidden = update.shape
    stream = update if residual is None else torch.empty_like(update)
    dtype = torch.promote_types(weight.dtype, update.dtype)
    normed = torch.empty((rows, hidden), dtype=dtype, device=update.device)
    if rows == 0:
        return normed, stream
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(rows,)](
        update, residual if residual is not None else update, weight, normed, stream,
        hidden, eps, update.stride(0),
        residual.stride(0) if residual is not None else 0, normed.stride(0), stream.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 512)),
    )
    return normed, stream
