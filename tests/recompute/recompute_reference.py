"""Reference computations the recompute tests compare against (test-only helpers).

``full_prefill`` is the model's own forward; ``reuse_by_alignment`` stands in for the
reuse planner: a difflib token alignment, copying source K/V rows to the target and
re-rotating keys by the position shift, as the connector will do with a ``ReusePlan``.
"""

from __future__ import annotations

import difflib

import numpy as np
import torch

from kvshare.recompute import PromptKV, rerotate_keys


@torch.no_grad()
def full_prefill(model: torch.nn.Module, token_ids: torch.Tensor) -> tuple[PromptKV, torch.Tensor]:
    """K/V of every layer (dense, token-major) and float32 last-token logits of ``model(ids)``."""
    out = model(token_ids[None], use_cache=True, logits_to_keep=1)
    layers = out.past_key_values.layers
    keys = torch.stack([layer.keys[0].transpose(0, 1) for layer in layers])
    values = torch.stack([layer.values[0].transpose(0, 1) for layer in layers])
    return PromptKV(keys=keys.contiguous(), values=values.contiguous()), out.logits[0, -1].float()


def reuse_by_alignment(
    src_ids: torch.Tensor, src_kv: PromptKV, dst_ids: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[PromptKV, np.ndarray]:
    """Reused K/V for ``dst_ids`` from ``src_kv``, and the initial recompute positions.

    Follows the ``ReusePlan`` convention: runs of equal tokens are reused, except the
    first token of a run that does not start the prompt (its source context differs: the
    boundary token); every uncovered position and the last position are recomputed.
    Recompute rows are left zero.
    """
    matcher = difflib.SequenceMatcher(a=src_ids.tolist(), b=dst_ids.tolist(), autojunk=False)
    src_of = np.full(len(dst_ids), -1, dtype=np.int64)
    for a, b, size in matcher.get_matching_blocks():
        skip = 0 if a == b == 0 else 1  # only an exact prefix has no boundary token
        src_of[b + skip : b + size] = np.arange(a + skip, a + size)
    src_of[-1] = -1
    dst_pos = np.flatnonzero(src_of >= 0)
    src_pos = src_of[dst_pos]

    num_layers, _, heads, head_dim = src_kv.keys.shape
    shape = (num_layers, len(dst_ids), heads, head_dim)
    reused = PromptKV(
        keys=torch.zeros(shape, dtype=src_kv.keys.dtype),
        values=torch.zeros(shape, dtype=src_kv.keys.dtype),
    )
    reused.keys[:, dst_pos] = rerotate_keys(
        src_kv.keys[:, src_pos], torch.from_numpy(dst_pos - src_pos), inv_freq
    )
    reused.values[:, dst_pos] = src_kv.values[:, src_pos]
    return reused, np.flatnonzero(src_of < 0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius, float64)."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def kl_divergence(expected_logits: torch.Tensor, actual_logits: torch.Tensor) -> float:
    """KL(expected || actual) of the next-token distributions, in nats."""
    p = torch.log_softmax(expected_logits.double(), dim=-1)
    q = torch.log_softmax(actual_logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum())
