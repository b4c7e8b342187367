"""The model interface the selective-recompute engine drives, one decoder step at a time.

The engine never calls a model's ``forward``: it needs to run each decoder layer on an
arbitrary subset of prompt positions while attending over K/V rows that partly come
from another prompt. So a model is exposed as the handful of steps of a pre-norm
Llama-style decoder layer::

    x, residual = input_norm(l, update, residual)   # residual is None at layer 0
    q, k, v = qkv(l, x)                              # before RoPE
    q, k = rope(q, k, positions)
    keys[l][positions], values[l][positions] = k, v
    attn = attention(l, q, positions, keys[l], values[l])
    x, residual = post_attention_norm(l, o_proj(l, attn), residual)
    update = mlp(l, x)
    ...
    logits = logits(update, residual)                # after the last layer

The residual stream is carried as (pending update, residual) and the add happens
inside the norms, as in vLLM's decoder layers: vLLM's fused add + RMSNorm normalises
the float32 sum, not the rounded bf16 residual, so an interface that handed adapters a
pre-summed hidden state could not reproduce vLLM's prefill bit for bit.

Adapters wrap a model's own modules (transformers here; vLLM's Llama/Qwen2 modules and
attention backend later), so the engine reproduces the model's numerics instead of
re-implementing them.

Shapes (``n`` = rows in the call, ``T`` = prompt length in tokens):
hidden states ``[n, hidden_size]``; queries ``[n, num_heads, head_dim]``; keys and values
``[n, num_kv_heads, head_dim]`` per call and ``[T, num_kv_heads, head_dim]`` per layer for
the whole prompt (row ``i`` is the token at absolute position ``i``); positions are
int64 ``[n]`` absolute token positions, strictly increasing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ModelAdapter(ABC):
    """One decoder-only model seen as per-layer steps (see the module docstring).

    Keys handed to and returned by an adapter are *post-RoPE* (rotated to their
    absolute position), the form KV caches store. RoPE must use the half-split
    ("neox") layout with fixed frequencies ``rope_inv_freq``, so that stored keys can be
    moved to other positions by :func:`kvshare.recompute.rope.rerotate_keys`.
    """

    num_layers: int
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    """The dtype hidden states, K and V are computed and stored in."""
    device: torch.device

    @property
    @abstractmethod
    def rope_inv_freq(self) -> torch.Tensor:
        """float32 ``[head_dim // 2]``: rotation angle per position of each frequency pair.

        Excludes any attention scaling folded into cos/sin (YaRN's mscale): a
        re-rotation of an already scaled key must be a pure rotation.
        """

    @abstractmethod
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[n]`` -> hidden ``[n, hidden_size]`` (input of layer 0)."""

    @abstractmethod
    def input_norm(
        self, layer: int, update: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``update`` to the residual stream, apply the pre-attention norm.

        Returns ``(normed, new residual)``, both ``[n, hidden_size]``. At layer 0
        ``residual`` is None and ``update`` is the embedding, which becomes the residual.
        """

    @abstractmethod
    def qkv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed ``x`` ``[n, hidden_size]`` -> q, k, v before RoPE (shapes in module doc)."""

    @abstractmethod
    def rope(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate row ``i`` of ``q`` and ``k`` to absolute position ``positions[i]``."""

    @abstractmethod
    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        q_positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        """Causal attention of post-RoPE queries over the whole prompt's K/V of ``layer``.

        Query ``i`` sees key rows ``0 .. q_positions[i]`` (causal by absolute position,
        not by row order of ``q``). ``keys``/``values`` are ``[T, num_kv_heads, head_dim]``
        and already hold this layer's fresh rows for ``q_positions``. Returns
        ``[n, num_heads * head_dim]``, the input of ``o_proj``.
        """

    @abstractmethod
    def o_proj(self, layer: int, attn_out: torch.Tensor) -> torch.Tensor:
        """Attention output ``[n, num_heads * head_dim]`` -> residual update ``[n, hidden]``."""

    @abstractmethod
    def post_attention_norm(
        self, layer: int, update: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the attention ``update`` to the residual stream, apply the pre-MLP norm.

        Returns ``(normed, new residual)``.
        """

    @abstractmethod
    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Normed ``x`` -> residual update ``[n, hidden_size]``."""

    @abstractmethod
    def logits(self, update: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Last layer's (update, residual) ``[n, hidden_size]`` -> final norm, LM head.

        Returns ``[n, vocab]``.
        """
