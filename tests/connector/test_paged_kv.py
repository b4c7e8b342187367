"""PagedKV reads back, bit for bit, what vLLM's CPU KV write op wrote, in every block
layout the op writes on this host, and refuses writers whose layout it cannot locate.

No engine: a layer is a stand-in for vLLM's ``Attention`` module that carries vLLM's real
``CPUAttentionBackendImpl``, whose ``do_kv_cache_update`` calls the real op
(``cpu_attn_reshape_and_cache``) with the layer's ISA. Which ISAs, dtypes and head sizes
the op accepts is probed on the host, not assumed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvshare.config import ConfigError
from kvshare.connector.paged_kv import PagedKV

VLLM_CPU_ISAS = ("amx", "vec", "vec16", "neon", "rvv", "vxe", "vsx")
"""Every ISA vLLM 0.32's CPU attention may pick; the op accepts some of them per host."""

FIXTURE = Path(__file__).parent.parent / "fixtures" / "cpu_kv_layouts.safetensors"
LAYER = "model.layers.0.self_attn.attn"
NUM_KV_HEADS = 3


@dataclass
class AttentionLayer:
    """What ``do_kv_cache_update`` and PagedKV use of vLLM's ``Attention`` module."""

    impl: object
    isa: str
    layer_name: str = LAYER
    _k_scale_float: float = 1.0
    _v_scale_float: float = 1.0


@functools.cache
def vllm_config(dtype: torch.dtype):
    """vLLM's default config with a model of ``dtype``: its ``model_config`` carries only
    the dtype, all the impl reads of it (a real one would load a model's config)."""
    from vllm.config import VllmConfig

    config = VllmConfig()
    config.model_config = SimpleNamespace(dtype=dtype)
    return config


def cpu_attention_impl(dtype: torch.dtype, head_size: int, kv_cache_dtype: str = "auto"):
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    with set_current_vllm_config(vllm_config(dtype)):
        return CPUAttentionBackendImpl(
            num_heads=NUM_KV_HEADS, head_size=head_size, scale=head_size ** -0.5,
            num_kv_heads=NUM_KV_HEADS, alibi_slopes=None, sliding_window=None,
            kv_cache_dtype=kv_cache_dtype)


def empty_cache(num_blocks: int, block_size: int, head_size: int, dtype: torch.dtype
                ) -> torch.Tensor:
    return torch.zeros((num_blocks, NUM_KV_HEADS, block_size, 2 * head_size), dtype=dtype)


def random_rows(num_rows: int, head_size: int, dtype: torch.dtype, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (num_rows, NUM_KV_HEADS, head_size)
    return (torch.randn(shape, generator=generator).to(dtype),
            torch.randn(shape, generator=generator).to(dtype))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def op_refusal(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> str | None:
    """Why vLLM's write op refuses this ISA and cache shape on this host; None if it runs."""
    layer = AttentionLayer(cpu_attention_impl(dtype, head_size), isa)
    keys, values = random_rows(2, head_size, dtype, seed=0)
    try:
        layer.impl.do_kv_cache_update(layer, keys, values,
                                      empty_cache(2, block_size, head_size, dtype),
                                      torch.tensor([0, block_size + 1]))
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None


def round_trips(paged: PagedKV, num_rows: int, seed: int) -> bool:
    """Random rows written with vLLM's op at random slots read back bit for bit."""
    cache = paged.caches[0]
    generator = torch.Generator().manual_seed(seed)
    slots = torch.randperm(cache.shape[0] * paged.block_size, generator=generator)[:num_rows]
    keys, values = random_rows(num_rows, paged.head_size, cache.dtype, seed)
    paged.write(0, keys, values, slots)
    read_keys, read_values = paged.read(0, slots)
    return same_bits(read_keys, keys) and same_bits(read_values, values)


CACHE_SHAPES = [(dtype, block_size, head_size)
                for dtype in (torch.bfloat16, torch.float16, torch.float32)
                for block_size in (32, 128) for head_size in (64, 80)]
"""(dtype, block size, head size); head size 80 is one vLLM sends to ``vec16``."""


@pytest.mark.parametrize("isa", VLLM_CPU_ISAS)
def test_rows_written_by_vllm_read_back_bit_for_bit(isa):
    """In every cache shape the op accepts with this ISA on this host."""
    refusals = {shape: op_refusal(isa, *shape) for shape in CACHE_SHAPES}
    if all(refusals.values()):
        pytest.skip(f"vLLM's CPU KV write op refuses ISA {isa!r} on this host: "
                    f"{refusals[CACHE_SHAPES[0]]}")
    for (dtype, block_size, head_size), refusal in refusals.items():
        if refusal:
            continue
        layer = AttentionLayer(cpu_attention_impl(dtype, head_size), isa)
        paged = PagedKV([layer], {LAYER: empty_cache(5, block_size, head_size, dtype)})
        assert round_trips(paged, num_rows=3 * block_size + 7, seed=1), (
            f"{dtype}, block size {block_size}, head size {head_size}")


def test_vllm_picks_an_isa_the_op_accepts_here():
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.bfloat16, 128, 64, "auto")
    assert isa in VLLM_CPU_ISAS
    layer = AttentionLayer(cpu_attention_impl(torch.bfloat16, 64), isa)
    paged = PagedKV([layer], {LAYER: empty_cache(4, 128, 64, torch.bfloat16)})
    assert round_trips(paged, num_rows=300, seed=2)


def test_blocks_apart_and_off_the_start_of_their_buffer_are_read():
    """vLLM may pad each block of a layer (pages aligned) and place layers in one buffer."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    block_size, head_size, num_blocks, padding, start = 32, 64, 5, 192, 4096
    block_elements = NUM_KV_HEADS * block_size * 2 * head_size
    buffer = torch.zeros(start + num_blocks * (block_elements + padding), dtype=torch.bfloat16)
    cache = buffer[start:].as_strided(
        (num_blocks, NUM_KV_HEADS, block_size, 2 * head_size),
        (block_elements + padding, block_size * 2 * head_size, 2 * head_size, 1))
    isa = _get_attn_isa(torch.bfloat16, block_size, head_size, "auto")
    layer = AttentionLayer(cpu_attention_impl(torch.bfloat16, head_size), isa)
    paged = PagedKV([layer], {LAYER: cache})
    assert round_trips(paged, num_rows=4 * block_size, seed=3)
    assert not buffer[:start].any()


@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("isa", ["amx", "vec"])
def test_caches_written_on_an_amx_host_read_back_to_their_rows(isa, block_size):
    from safetensors.torch import load_file

    refusal = op_refusal(isa, torch.bfloat16, block_size, 64)
    if refusal:
        pytest.skip(f"vLLM's CPU KV write op refuses ISA {isa!r} on this host: {refusal}")
    fixture = load_file(FIXTURE)
    layer = AttentionLayer(cpu_attention_impl(torch.bfloat16, 64), isa)
    paged = PagedKV([layer], {LAYER: fixture[f"bs{block_size}.{isa}.cache"]})
    keys, values = paged.read(0, fixture[f"bs{block_size}.slots"])
    assert same_bits(keys, fixture[f"bs{block_size}.key"])
    assert same_bits(values, fixture[f"bs{block_size}.value"])


def test_the_fixtures_amx_and_vec_layouts_differ():
    from safetensors.torch import load_file

    fixture = load_file(FIXTURE)
    for block_size in (32, 128):
        assert not torch.equal(fixture[f"bs{block_size}.amx.cache"],
                               fixture[f"bs{block_size}.vec.cache"])


# ------------------------------------------------------------------ faults injected
def duplicate_first_dim(keys, values):
    keys = keys.clone()
    keys[:, :, 1] = keys[:, :, 0]
    return keys, values


def round_values(keys, values):
    """What a quantized cache does to values (1..16 survive, random values do not)."""
    return keys.round(), values.round()


def drop_last_dim(cache):
    cache[:, :, :, -1] = 0


def spill_into_block_1(cache):
    cache[1] = cache[0]


def shift_blocks_from_2(cache):
    cache[2:] = cache[2:].roll(1, dims=-1)


@dataclass
class FaultyImpl:
    """vLLM's impl with a fault injected into the rows it is given or the cache after."""

    real: object
    rows_fault: object = None
    cache_fault: object = None

    @property
    def kv_cache_dtype(self) -> str:
        return self.real.kv_cache_dtype

    def do_kv_cache_update(self, layer, keys, values, kv_cache, slots):
        if self.rows_fault:
            keys, values = self.rows_fault(keys, values)
        self.real.do_kv_cache_update(layer, keys, values, kv_cache, slots)
        if self.cache_fault:
            self.cache_fault(kv_cache)


@pytest.mark.parametrize("rows_fault, cache_fault, refusal", [
    pytest.param(None, drop_last_dim, r"left \d+ of the \d+ elements of 2 blocks unwritten",
                 id="drops"),
    pytest.param(duplicate_first_dim, None, "in more than one place", id="duplicates"),
    pytest.param(None, spill_into_block_1,
                 r"touched \d+ elements of a block it was given no slot in", id="spills"),
    pytest.param(None, shift_blocks_from_2, "lays out block 2 differently from block 0",
                 id="varies by block"),
    pytest.param(round_values, None, "does not return what vLLM wrote", id="changes values"),
])
def test_a_write_kvshare_cannot_read_is_refused_naming_the_isa(rows_fault, cache_fault,
                                                               refusal):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.bfloat16, 32, 64, "auto")
    impl = FaultyImpl(cpu_attention_impl(torch.bfloat16, 64), rows_fault, cache_fault)
    with pytest.raises(RuntimeError, match=rf"ISA {isa!r}.*{refusal}"):
        PagedKV([AttentionLayer(impl, isa)], {LAYER: empty_cache(4, 32, 64, torch.bfloat16)})


def test_a_quantized_kv_cache_is_refused_naming_the_setting():
    layer = AttentionLayer(cpu_attention_impl(torch.bfloat16, 64, kv_cache_dtype="fp8"), "vec")
    with pytest.raises(ConfigError, match=r"model dtype.*kv_cache_dtype='fp8'.*auto"):
        PagedKV([layer], {LAYER: empty_cache(4, 32, 64, torch.bfloat16)})


@dataclass
class PermutingImpl:
    """Writes element (K or V, token, head, dim) of a block to the place ``places`` gives
    it: any layout, as a permutation of the block's elements."""

    places: torch.Tensor
    """int64 ``[2, block_size, num_kv_heads, head_size]``: offsets within the block."""
    kv_cache_dtype: str = "auto"

    def do_kv_cache_update(self, layer, keys, values, kv_cache, slots):
        block_size = self.places.shape[1]
        blocks = kv_cache.view(kv_cache.shape[0], -1)
        for places, rows in zip(self.places, (keys, values)):
            blocks[(slots // block_size)[:, None, None], places[slots % block_size]] = rows


def scattered_but_the_first_keys(block_elements: int) -> torch.Tensor:
    """Token 0's keys in order, every other element anywhere: only the other tokens show
    that there is no pattern shared by all tokens."""
    first_keys = NUM_KV_HEADS * 64
    rest = torch.randperm(block_elements - first_keys, generator=torch.Generator().manual_seed(4))
    return torch.cat((torch.arange(first_keys), first_keys + rest))


def rows_from_odd_offsets(block_elements: int) -> torch.Tensor:
    """The natural order shifted by one element: rows are contiguous runs that start at
    odd offsets, so they cannot be read in words of 2 elements."""
    return (torch.arange(block_elements) + 1) % block_elements


@pytest.mark.parametrize("places", [scattered_but_the_first_keys, rows_from_odd_offsets])
def test_layouts_vllm_does_not_write_today_are_read_too(places):
    block_size, head_size = 32, 64
    block_elements = 2 * block_size * NUM_KV_HEADS * head_size
    impl = PermutingImpl(places(block_elements).view(2, block_size, NUM_KV_HEADS, head_size))
    layer = AttentionLayer(impl, "permuting")
    paged = PagedKV([layer], {LAYER: empty_cache(4, block_size, head_size, torch.bfloat16)})
    assert round_trips(paged, num_rows=100, seed=5)
