"""`ModelAdapter` over a transformers Llama or Qwen2 (incl. Qwen2.5) causal LM.

Every step calls the model's own modules (projections with their biases, RMSNorms, MLP,
rotary embedding and the modeling file's ``apply_rotary_pos_emb``), so a full
recompute reproduces ``model(input_ids)``. Only attention is ours: the model's attention
module assumes queries are the last rows of the K/V, while the engine asks for queries at
scattered positions. When every position is queried we call torch SDPA with
``is_causal``; otherwise :func:`kvshare.kernels.partial_attention.partial_attention`,
which masks by absolute position (a Triton kernel on CUDA; on CPU, SDPA with a boolean
mask built from the positions). GQA is never materialised as repeated heads.

On CUDA the residual add + RMSNorm and the RoPE application run as one Triton kernel
each (:mod:`kvshare.kernels.rms_norm`, :mod:`kvshare.kernels.rotary`) instead of the
modules' ten or so element-wise kernels: for the few rows tracked per layer, launching
those kernels, not running them, bounded the time. The kernels round where the modules
round, with the modules' own weights, epsilon and cos/sin; on the GPU their bf16 results
can differ from the modules' by one rounding (see the kernels' docstrings). On CPU the
modules run as they are.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from kvshare.kernels.partial_attention import partial_attention
from kvshare.kernels.rms_norm import add_rms_norm
from kvshare.kernels.rotary import apply_rotary
from kvshare.recompute.adapter import ModelAdapter

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class HFDecoderAdapter(ModelAdapter):
    """Adapter for ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (eval mode, no grad needed).

    Refused configurations, because reused K/V could not match the model's own prefill:
    RoPE types whose frequencies depend on the prompt length (``dynamic``, ``longrope``),
    and sliding-window layers (Qwen2 ``use_sliding_window``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {config.model_type!r} is not supported; "
                f"expected one of {SUPPORTED_MODEL_TYPES}"
            )
        self._decoder = model.model
        self._lm_head = model.lm_head
        self._rotary = self._decoder.rotary_emb
        rope_type = getattr(self._rotary, "rope_type", "default")
        if rope_type in _LENGTH_DEPENDENT_ROPE:
            raise ValueError(
                f"rope_type {rope_type!r} changes frequencies with prompt length; "
                f"stored keys cannot be re-rotated (supported: fixed-frequency types)"
            )
        sliding = [
            i
            for i, kind in enumerate(getattr(config, "layer_types", None) or ())
            if kind != "full_attention"
        ]
        if sliding:
            raise ValueError(
                f"layers {sliding} use sliding-window attention, which is not supported"
            )

        first_attn = self._decoder.layers[0].self_attn
        # The modeling file's own RoPE function, so numerics match the model's forward.
        self._apply_rotary = inspect.getmodule(first_attn).apply_rotary_pos_emb
        self._scaling = float(first_attn.scaling)

        self.num_layers = len(self._decoder.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = first_attn.head_dim
        param = self._lm_head.weight
        self.dtype = param.dtype
        self.device = param.device
        self._fused = self.device.type == "cuda"
        # cos/sin of the last positions tensor seen: the engine passes one tensor for
        # every layer until its tracked set changes, so most layers reuse them.
        self._rope_positions: torch.Tensor | None = None
        self._rope_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def rope_inv_freq(self) -> torch.Tensor:
        return self._rotary.inv_freq.float()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._decoder.embed_tokens(token_ids)

    def input_norm(
        self, layer: int, update: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self._decoder.layers[layer].input_layernorm
        if self._fused:
            return add_rms_norm(update, residual, norm.weight, norm.variance_epsilon)
        stream = update if residual is None else residual + update  # HF's add, model dtype
        return norm(stream), stream

    def qkv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self._decoder.layers[layer].self_attn
        n = x.shape[0]
        return (
            attn.q_proj(x).view(n, self.num_heads, self.head_dim),
            attn.k_proj(x).view(n, self.num_kv_heads, self.head_dim),
            attn.v_proj(x).view(n, self.num_kv_heads, self.head_dim),
        )

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`ModelAdapter.rope`. cos/sin are kept for the ``positions`` object
        last seen (held, so its identity cannot be reused), which assumes callers never
        modify a positions tensor in place after passing it (the engine does not)."""
        if positions is not self._rope_positions or self._rope_cos_sin is None:
            cos, sin = self._rotary(q, positions[None, :])  # [1, n, head_dim] each
            self._rope_positions, self._rope_cos_sin = positions, (cos[0], sin[0])
        cos, sin = self._rope_cos_sin
        if self._fused:
            return apply_rotary(q, k, cos, sin)
        # [n, heads, D] rows with cos [n, D]: unsqueeze at dim 1 broadcasts over heads.
        return self._apply_rotary(q, k, cos, sin, unsqueeze_dim=1)

    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        q_positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        if q.shape[0] != keys.shape[0]:
            out = partial_attention(q, q_positions, keys, values, self._scaling)
            return out.reshape(q.shape[0], -1)
        # Positions are strictly increasing, so this is every position: a plain causal
        # prefill, where SDPA's is_causal skips the masked half (2x faster on CPU) and
        # uses its flash kernels on CUDA.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, Hq, n, D]
            keys.transpose(0, 1)[None],  # [1, Hkv, T, D]
            values.transpose(0, 1)[None],
            is_causal=True,
            scale=self._scaling,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)

    def o_proj(self, layer: int, attn_out: torch.Tensor) -> torch.Tensor:
        return self._decoder.layers[layer].self_attn.o_proj(attn_out)

    def post_attention_norm(
        self, layer: int, update: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self._decoder.layers[layer].post_attention_layernorm
        if self._fused:
            return add_rms_norm(update, residual, norm.weight, norm.variance_epsilon)
        stream = residual + update
        return norm(stream), stream

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self._decoder.layers[layer].mlp(x)

    def logits(self, update: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._lm_head(self._decoder.norm(residual + update))
