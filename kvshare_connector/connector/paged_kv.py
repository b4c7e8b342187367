"""Reading and writing one request's rows of vLLM CPU's paged KV cache.

CPU cache per layer: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``. Slot of
position ``p`` = ``block_ids[p // bs] * bs + p % bs``. Where a row's elements sit inside
a block depends on the ISA vLLM's CPU attention picked for the host, dtype, block size
and head size (``amx``, ``vec``, ``vec16``, ``neon``, ...); vLLM has a write op for it,
no read op.

Writes always go through the attention impl's ``do_kv_cache_update`` (vLLM's own
``cpu_attn_reshape_and_cache``). Reads gather by a map that :class:`PagedKV` derives at
start-up from that same write op (:mod:`kvshare.connector.block_layout`), run on a
scratch cache of the real cache's dtype, block size, heads, head size and strides with
the real ISA. No layout is transcribed per ISA, so none is unsupported by omission: an
ISA vLLM adds or changes is read correctly or refused, never misread.

Proven at start-up, else kvshare refuses to start (a wrong read would store wrong KV
silently): the KV cache holds the model dtype (``kv_cache_dtype="auto"``); the op writes
every element of a block exactly once across keys and values, the same way in every
block, and nothing outside the slots it is given; random rows written by the op at
random slots of three blocks read back bit for bit.
"""

from __future__ import annotations

from functools import partial

import torch

from kvshare.config import ConfigError
from kvshare.connector.block_layout import BlockLayout, BlockLayoutError, derive_block_layout


class PagedKV:
    """Rows of the paged caches of all attention layers, in layer order.

    All layers share one ISA, cache shape and dtype (checked), so one block layout
    serves them all.

    Args:
        attn_layers: vLLM ``Attention`` modules, one per decoder layer, in order.
        kv_caches: layer name -> that layer's cache tensor (``register_kv_caches``).
    """

    def __init__(self, attn_layers: list[torch.nn.Module], kv_caches: dict[str, torch.Tensor]
                 ) -> None:
        self.layers = attn_layers
        self.caches = [kv_caches[layer.layer_name] for layer in attn_layers]
        first, cache = attn_layers[0], self.caches[0]
        self.isa: str | None = getattr(first, "isa", None)
        self.num_kv_heads, self.block_size = cache.shape[1], cache.shape[2]
        self.head_size = cache.shape[3] // 2
        self._check_caches()
        self.layout = self._derive_layout()
        self._prove_read_back()

    def slots(self, block_ids: list[int] | torch.Tensor, start: int, end: int) -> torch.Tensor:
        """int64 slots of positions ``[start, end)`` of a request holding ``block_ids``."""
        return slots_of(block_ids, torch.arange(start, end, dtype=torch.int64),
                        self.block_size)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              slots: torch.Tensor) -> None:
        """Write ``[n, num_kv_heads, head_size]`` rows at ``slots`` with vLLM's own op."""
        attn = self.layers[layer]
        attn.impl.do_kv_cache_update(attn, keys, values, self.caches[layer], slots)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, num_kv_heads, head_size]`` stored at ``slots``."""
        return self.layout.gather(self.caches[layer], slots)

    def _check_caches(self) -> None:
        kv_cache_dtype = self.layers[0].impl.kv_cache_dtype
        if kv_cache_dtype != "auto":
            raise ConfigError(
                f"kvshare stores KV in the model dtype, but vLLM runs with "
                f"kv_cache_dtype={kv_cache_dtype!r}; start vLLM with --kv-cache-dtype auto"
            )
        first_layer, first = self.layers[0], self.caches[0]
        for attn, cache in zip(self.layers, self.caches):
            isa = getattr(attn, "isa", None)
            if (isa, cache.shape[1:], cache.stride(), cache.dtype) != (
                    self.isa, first.shape[1:], first.stride(), first.dtype):
                raise RuntimeError(
                    f"kvshare reads all layers with one block layout, but layer "
                    f"{attn.layer_name} has ISA {isa!r} and a cache {tuple(cache.shape)} "
                    f"{cache.dtype} with strides {cache.stride()}, layer "
                    f"{first_layer.layer_name} ISA {self.isa!r} and {tuple(first.shape)} "
                    f"{first.dtype} with strides {first.stride()}"
                )

    def _derive_layout(self) -> BlockLayout:
        first = self.layers[0]
        try:
            return derive_block_layout(partial(first.impl.do_kv_cache_update, first),
                                       self.caches[0])
        except BlockLayoutError as error:
            raise RuntimeError(
                f"kvshare cannot locate the KV rows that vLLM's CPU attention writes with "
                f"ISA {self.isa!r}: {error}; refusing to store or reuse KV"
            ) from error

    def _prove_read_back(self) -> None:
        """Random rows written by vLLM at random slots of 3 blocks read back bit for bit,
        and every layer's cache can be viewed the way the layout reads it."""
        like = self.caches[0]
        scratch = torch.empty_strided((3, *like.shape[1:]), like.stride(), dtype=like.dtype)
        scratch.zero_()
        generator = torch.Generator().manual_seed(0)
        num_rows = 2 * self.block_size
        shape = (num_rows, self.num_kv_heads, self.head_size)
        keys = torch.randn(shape, generator=generator).to(like.dtype)
        values = torch.randn(shape, generator=generator).to(like.dtype)
        slots = torch.randperm(3 * self.block_size, generator=generator)[:num_rows]
        first = self.layers[0]
        first.impl.do_kv_cache_update(first, keys, values, scratch, slots)
        read_keys, read_values = self.layout.gather(scratch, slots)
        if not (_same_bits(read_keys, keys) and _same_bits(read_values, values)):
            raise RuntimeError(
                f"kvshare: reading vLLM's paged KV cache (ISA {self.isa!r}) does not return "
                "what vLLM wrote; refusing to store or reuse KV"
            )
        no_slots = torch.empty(0, dtype=torch.int64)
        for cache in self.caches:
            self.layout.gather(cache, no_slots)


def slots_of(block_ids: list[int] | torch.Tensor, positions: torch.Tensor,
             block_size: int) -> torch.Tensor:
    """int64 slots of arbitrary ``positions`` of a request holding ``block_ids``."""
    blocks = torch.as_tensor(block_ids, dtype=torch.int64)[positions // block_size]
    return blocks * block_size + positions % block_size


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (``torch.equal`` would take -0.0 for 0.0)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
