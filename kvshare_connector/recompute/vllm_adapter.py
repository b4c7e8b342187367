"""`ModelAdapter` over vLLM's Llama / Qwen2 (incl. Qwen2.5) modules, on vLLM's CPU attention.

Every step calls the loaded vLLM model's own modules (merged ``qkv_proj``, fused
add + RMSNorm, ``rotary_emb``, ``o_proj``, MLP), so numerics are vLLM's. Attention, too,
is vLLM's kernel over the request's own paged blocks: before a layer's attention the
adapter writes that layer's K/V rows (fresh and reused) into the blocks with vLLM's
``do_kv_cache_update``, groups the queries into contiguous runs of positions and calls
``cpu_attention_with_kv_cache`` with one "request" per run, each run shaped like a
chunked-prefill piece (``seq_len`` = its last position + 1). With every position
queried in one run this is exactly vLLM's own prefill, which is why ``rho = 1``
reproduces vanilla vLLM (measured bit for bit; fp32 SDPA was 8x slower and not exact).

An adapter is bound to one request at a time (:meth:`bind`): its blocks, and the first
position it may write (positions below are vLLM's exact prefix-cache hit). Only the
engine's thread may call it: vLLM's modules are not thread-safe (see
:mod:`kvshare.connector.shadow`).
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm import envs

from kvshare.recompute.adapter import ModelAdapter

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class VLLMDecoderAdapter(ModelAdapter):
    """Adapter for a loaded vLLM ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (TP = 1).

    Args:
        model: the module vLLM's model runner loaded.
        paged: the request-independent view of the paged caches
            (:class:`kvshare.connector.paged_kv.PagedKV`):
            its ``slots``/``write`` place rows and its ``caches`` are attended over.
    """

    def __init__(self, model: torch.nn.Module, paged) -> None:
        name = type(model).__name__
        if name not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model class {name!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}"
            )
        self._model = model
        self._layers = list(model.model.layers)
        self._paged = paged
        first = self._layers[0].self_attn
        self._rotary = first.rotary_emb
        if not getattr(self._rotary, "is_neox_style", True):
            raise ValueError("kvshare re-rotates keys in the neox (half-split) RoPE layout only")
        if getattr(first.attn.impl, "sliding_window", -1) not in (-1, None):
            raise ValueError("sliding-window attention layers are not supported")
        self._q_size, self._kv_size = first.q_size, first.kv_size
        self.num_layers = len(self._layers)
        self.num_heads = first.num_heads
        self.num_kv_heads = first.num_kv_heads
        self.head_dim = first.head_dim
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self._block_ids = torch.zeros(0, dtype=torch.int32)
        self._write_from = 0
        self.written_layers: set[int] = set()
        """Layers whose rows ``[write_from, end)`` are in the blocks since :meth:`bind`."""

    def bind(self, block_ids: list[int], write_from: int) -> None:
        """Attend over (and write into) these blocks; never write positions < ``write_from``."""
        self._block_ids = torch.as_tensor(block_ids, dtype=torch.int32)
        self._write_from = write_from
        self.written_layers = set()

    @property
    def rope_inv_freq(self) -> torch.Tensor:
        return self._rotary._compute_inv_freq(self._rotary.base).float()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._model.model.embed_tokens(token_ids)

    def input_norm(self, layer, update, residual):
        norm = self._layers[layer].input_layernorm
        if residual is None:
            return norm(update), update
        return norm(update, residual)

    def qkv(self, layer, x):
        attn = self._layers[layer].self_attn
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([self._q_size, self._kv_size, self._kv_size], dim=-1)
        n = x.shape[0]
        return (q.reshape(n, self.num_heads, self.head_dim),
                k.reshape(n, self.num_kv_heads, self.head_dim),
                v.reshape(n, self.num_kv_heads, self.head_dim))

    def rope(self, q, k, positions):
        n = q.shape[0]
        q, k = self._rotary(positions, q.reshape(n, -1).contiguous(), k.reshape(n, -1).contiguous())
        return (q.reshape(n, self.num_heads, self.head_dim),
                k.reshape(n, self.num_kv_heads, self.head_dim))

    def attention(self, layer, q, q_positions, keys, values):
        paged = self._paged
        start, end = self._write_from, keys.shape[0]
        if end > start:
            slots = paged.slots(self._block_ids, start, end)
            paged.write(layer, keys[start:end], values[start:end], slots)
            self.written_layers.add(layer)
        return self._paged_attention(layer, q, q_positions)

    def _paged_attention(self, layer: int, q: torch.Tensor, q_positions: torch.Tensor
                         ) -> torch.Tensor:
        """vLLM's CPU kernel, one chunked-prefill-shaped query run per contiguous span."""
        attn = self._paged.layers[layer]
        impl = attn.impl
        breaks = torch.nonzero(q_positions[1:] - q_positions[:-1] != 1).flatten() + 1
        run_starts = torch.cat((torch.zeros(1, dtype=torch.int64), breaks))
        run_ends = torch.cat((breaks, torch.tensor([q_positions.numel()])))
        num_runs = run_starts.numel()
        query_start_loc = torch.cat((run_starts, run_ends[-1:])).to(torch.int32)
        seq_lens = (q_positions[run_ends - 1] + 1).to(torch.int32)
        block_table = self._block_ids[None, :].expand(num_runs, -1).contiguous()
        cache = self._paged.caches[layer]
        nb, heads, bs, _ = cache.shape
        key_cache, value_cache = cache.view(nb, heads, 2 * bs, -1).chunk(2, dim=2)
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=num_runs, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=seq_lens, dtype=self.dtype,
            query_start_loc=query_start_loc, causal=True, sliding_window_size=-1,
            isa=attn.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=impl.kv_cache_dtype,
        )
        output = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q.contiguous(), key_cache=key_cache, value_cache=value_cache, output=output,
            query_start_loc=query_start_loc, seq_lens=seq_lens, scale=impl.scale, causal=True,
            alibi_slopes=impl.alibi_slopes, sliding_window=impl.sliding_window,
            block_table=block_table, softcap=impl.logits_soft_cap,
            scheduler_metadata=scheduler_metadata, s_aux=impl.sinks,
            k_scale=attn._k_scale_float, v_scale=attn._v_scale_float,
            kv_cache_dtype=impl.kv_cache_dtype,
        )
        return output.reshape(q.shape[0], -1)

    def o_proj(self, layer, attn_out):
        out, _ = self._layers[layer].self_attn.o_proj(attn_out)
        return out

    def post_attention_norm(self, layer, update, residual):
        return self._layers[layer].post_attention_layernorm(update, residual)

    def mlp(self, layer, x):
        return self._layers[layer].mlp(x)

    def logits(self, update, residual):
        hidden, _ = self._model.model.norm(update, residual)
        return self._model.compute_logits(hidden)

