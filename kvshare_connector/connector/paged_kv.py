"""Reading and writing one request's rows of vLLM CPU's paged KV cache.

Writes always go through the attention impl's ``do_kv_cache_update`` (vLLM's own
``reshape_and_cache``): its layout depends on the CPU ISA the backend picked. Reads
have no vLLM op, so :class:`PagedKV` gathers rows itself for the layouts it knows, and
proves it at start-up: it writes random rows with vLLM's op into a scratch cache and
must read them back bit for bit, else the connector refuses to start (a wrong read
would store wrong KV silently).

CPU cache per layer: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``; viewed
as ``[num_blocks, num_kv_heads, 2 * block_size, head_size]`` its first half holds keys
and the second values. Slot of position ``p`` = ``block_ids[p // bs] * bs + p % bs``.
"""

from __future__ import annotations

import torch

READABLE_ISAS = ("vec", "vec16", "neon")
"""ISAs whose key blocks are stored as ``[head_size, block_size]`` and value blocks as
``[block_size, head_size]`` (checked at start-up, not trusted)."""


class PagedKV:
    """Rows of the paged caches of all attention layers, in layer order.

    Args:
        attn_layers: vLLM ``Attention`` modules, one per decoder layer, in order.
        kv_caches: layer name -> that layer's cache tensor (``register_kv_caches``).
    """

    def __init__(self, attn_layers: list[torch.nn.Module], kv_caches: dict[str, torch.Tensor]
                 ) -> None:
        self.layers = attn_layers
        self.caches = [kv_caches[layer.layer_name] for layer in attn_layers]
        self.num_kv_heads, self.block_size = self.caches[0].shape[1], self.caches[0].shape[2]
        self.head_size = self.caches[0].shape[3] // 2
        self._check_read_layout()

    def slots(self, block_ids: list[int] | torch.Tensor, start: int, end: int) -> torch.Tensor:
        """int64 slots of positions ``[start, end)`` of a request holding ``block_ids``."""
        positions = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.as_tensor(block_ids, dtype=torch.int64)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              slots: torch.Tensor) -> None:
        """Write ``[n, num_kv_heads, head_size]`` rows at ``slots`` with vLLM's own op."""
        attn = self.layers[layer]
        attn.impl.do_kv_cache_update(attn, keys, values, self.caches[layer], slots)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, num_kv_heads, head_size]`` stored at ``slots``."""
        return self._gather(self.caches[layer], slots)

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        nb, heads, bs, _ = cache.shape
        halves = cache.view(nb, heads, 2 * bs, self.head_size)
        key_blocks = halves[:, :, :bs].reshape(nb, heads, self.head_size, bs)
        value_blocks = halves[:, :, bs:]
        block, offset = slots // bs, slots % bs
        return key_blocks[block, :, :, offset], value_blocks[block, :, offset]

    def _check_read_layout(self) -> None:
        attn = self.layers[0]
        isa = getattr(attn, "isa", None)
        if isa not in READABLE_ISAS:
            raise RuntimeError(
                f"kvshare: vLLM's CPU attention uses ISA {isa!r}, whose KV block layout "
                f"kvshare cannot read yet (supported: {', '.join(READABLE_ISAS)})"
            )
        cache = self.caches[0]
        scratch = torch.zeros((2, *cache.shape[1:]), dtype=cache.dtype)
        n = 2 * self.block_size
        generator = torch.Generator().manual_seed(0)
        shape = (n, self.num_kv_heads, self.head_size)
        keys = torch.randn(shape, generator=generator).to(cache.dtype)
        values = torch.randn(shape, generator=generator).to(cache.dtype)
        slots = torch.randperm(n, generator=generator)
        attn.impl.do_kv_cache_update(attn, keys, values, scratch, slots)
        got_keys, got_values = self._gather(scratch, slots)
        if not (torch.equal(got_keys, keys) and torch.equal(got_values, values)):
            raise RuntimeError(
                f"kvshare: reading vLLM's paged KV cache (ISA {isa!r}) does not return "
                "what vLLM wrote; refusing to store or reuse KV"
            )
