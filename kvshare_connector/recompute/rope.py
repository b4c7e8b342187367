"""Move stored post-RoPE keys to new positions without recomputing them.

RoPE rotates each pair of key dimensions by ``position * inv_freq``. Rotations compose,
``R(p + d) k = R(d) R(p) k``, so a key cached at position ``p`` is exactly the key the
model would compute at ``p + d`` once rotated by ``d`` more. Values carry no position
and are reused as they are. Without this fix the layer-0 keys of a shifted span were
measured 43% off; with it, 0.25% (bf16 storage).

Layout: half-split ("neox", as in Llama/Qwen2 and vLLM's ``is_neox_style=True``): pair
``j`` is dimensions ``(j, j + head_dim // 2)``.
"""

from __future__ import annotations

import torch


def rerotate_keys(
    keys: torch.Tensor, delta: torch.Tensor | int, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Rotate post-RoPE ``keys`` by ``delta`` positions (new position minus old).

    Args:
        keys: ``[..., n, num_kv_heads, head_dim]``, e.g. one layer ``[n, H, D]`` or all
            layers at once ``[L, n, H, D]`` (the rotation is the same in every layer).
        delta: int, or int64 ``[n]`` with one delta per token row; may be negative.
        inv_freq: float ``[head_dim // 2]``, the model's RoPE frequencies
            (:attr:`ModelAdapter.rope_inv_freq`), without attention scaling.

    Returns a new tensor of the shape and dtype of ``keys``. The angles are formed in
    float64 and the rotation is applied in float32, so bf16 keys are rounded once.
    """
    if keys.dim() < 3:
        raise ValueError(f"keys must be [..., n, heads, head_dim], got shape {tuple(keys.shape)}")
    n, head_dim = keys.shape[-3], keys.shape[-1]
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(
            f"inv_freq has shape {tuple(inv_freq.shape)}, "
            f"expected ({head_dim // 2},) for head_dim {head_dim}"
        )
    delta = torch.as_tensor(delta, dtype=torch.int64, device=keys.device)
    if delta.dim() == 0:
        delta = delta.expand(n)
    if delta.shape != (n,):
        raise ValueError(
            f"delta has shape {tuple(delta.shape)}, expected () or ({n},) for {n} key rows"
        )

    angles = delta.to(torch.float64)[:, None] * inv_freq.to(keys.device, torch.float64)[None, :]
    angles = angles[:, None, :]  # [n, 1, D/2]: broadcast over heads
    cos, sin = angles.cos().float(), angles.sin().float()
    # Each half written straight into the output: no concatenated temporaries (3.5x
    # faster on CPU than rotate-half with torch.cat, bit-identical).
    half = head_dim // 2
    x1, x2 = keys[..., :half].float(), keys[..., half:].float()
    rotated = torch.empty_like(keys)
    rotated[..., :half] = x1 * cos - x2 * sin
    rotated[..., half:] = x2 * cos + x1 * sin
    return rotated
