"""`ModelAdapter` over a transformers Llama or Qwen2 (incl. Qwen2.5) causal LM.

Every step calls the model's own modules (projections with their biases, RMSNorms, MLP,
rotary embedding and the modeling file's ``apply_rotary_pos_emb``), so a full
recompute reproduces ``model(input_ids)``. Only attention is ours: the model's attention
module assumes queries are the last rows of the K/V, while the engine asks for queries at
scattered positions, so we call torch SDPA with a boolean mask built from absolute
positions. GQA is left to SDPA (``enable_gqa``) instead of materialising repeated heads.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

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

    @property
    def rope_inv_freq(self) -> torch.Tensor:
        return self._rotary.inv_freq.float()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._decoder.embed_tokens(token_ids)

    def input_norm(
        self, layer: int, update: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stream = update if residual is None else residual + update  # HF's add, model dtype
        return self._decoder.layers[layer].input_layernorm(stream), stream

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
        cos, sin = self._rotary(q, positions[None, :])  # [1, n, head_dim] each
        # [n, heads, D] rows with cos [n, D]: unsqueeze at dim 1 broadcasts over heads.
        return self._apply_rotary(q, k, cos[0], sin[0], unsqueeze_dim=1)

    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        q_positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        if q.shape[0] == keys.shape[0]:
            # Positions are strictly increasing, so this is every position: a plain causal
            # prefill, where SDPA's is_causal skips the masked half (2x faster on CPU).
            mask = None
        else:
            key_positions = torch.arange(keys.shape[0], device=keys.device)
            mask = key_positions[None, :] <= q_positions[:, None]  # [n, T], True = may attend
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, Hq, n, D]
            keys.transpose(0, 1)[None],  # [1, Hkv, T, D]
            values.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=self._scaling,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)

    def o_proj(self, layer: int, attn_out: torch.Tensor) -> torch.Tensor:
        return self._decoder.layers[layer].self_attn.o_proj(attn_out)

    def post_attention_norm(
        self, layer: int, update: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stream = residual + update
        return self._decoder.layers[layer].post_attention_layernorm(stream), stream

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self._decoder.layers[layer].mlp(x)

    def logits(self, update: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._lm_head(self._decoder.norm(residual + update))
