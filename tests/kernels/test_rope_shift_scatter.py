"""rope_shift_scatter: the Triton kernel against the PyTorch reference and vLLM's paged layout.

On CPU the kernel runs in Triton's interpreter (float32/float16, small shapes); on a GPU
compiled, with bf16 and Llama-3-8B-sized inputs. Every destination is poisoned with NaN
first, so rows the kernel should not write, and rows it forgot, both show.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_error

from kvshare.kernels.rope_shift_scatter import (
    KVDestination,
    rope_shift_scatter,
    rope_shift_scatter_reference,
)


def _triton():
    from kvshare.kernels._rope_shift_scatter_triton import rope_shift_scatter_triton

    return rope_shift_scatter_triton


def _inputs(device, dtype, chunks, layers, rows_per_chunk, heads, dim, num_rows, max_delta,
            seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(chunks, layers, 2, rows_per_chunk, heads, dim, generator=g).to(dtype)
    src_rows = torch.randperm(chunks * rows_per_chunk, generator=g)[:num_rows]
    deltas = torch.randint(-max_delta, max_delta + 1, (num_rows,), generator=g)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return [t.to(device) for t in (src, src_rows, deltas, inv_freq)]


def _poisoned(layers, num_rows, heads, dim, dtype, device):
    return torch.full((layers, num_rows, heads, dim), float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(kernel_device, dtype):
    if kernel_device.type == "cuda":
        dtype = torch.bfloat16
    layers, heads, dim, num_rows, total_rows = 2, 3, 16, 17, 40
    src, src_rows, deltas, inv_freq = _inputs(kernel_device, dtype, chunks=3, layers=layers,
                                              rows_per_chunk=8, heads=heads, dim=dim,
                                              num_rows=num_rows, max_delta=100_000, seed=1)
    dst_rows = torch.randperm(total_rows)[:num_rows].to(kernel_device)
    out = KVDestination(_poisoned(layers, total_rows, heads, dim, dtype, kernel_device),
                        _poisoned(layers, total_rows, heads, dim, dtype, kernel_device), dst_rows)
    ref = KVDestination(out.keys.clone(), out.values.clone(), dst_rows)

    _triton()(src, src_rows, deltas, inv_freq, out)
    rope_shift_scatter_reference(src, src_rows, deltas, inv_freq, ref)

    bound = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_error(out.keys[:, dst_rows], ref.keys[:, dst_rows]) < bound
    assert torch.equal(out.values[:, dst_rows], ref.values[:, dst_rows])
    untouched = torch.ones(total_rows, dtype=torch.bool)
    untouched[dst_rows.cpu()] = False
    assert out.keys[:, untouched.to(kernel_device)].isnan().all()
    assert out.values[:, untouched.to(kernel_device)].isnan().all()


def test_dense_and_paged_in_vllm_layouts(kernel_device):
    """One launch fills the dense KV and a paged cache; slots follow vLLM's block math."""
    dtype = torch.float32 if kernel_device.type == "cpu" else torch.bfloat16
    layers, heads, dim, num_rows, block_size, num_blocks = 3, 2, 32, 20, 4, 9
    src, src_rows, deltas, inv_freq = _inputs(kernel_device, dtype, chunks=2, layers=layers,
                                              rows_per_chunk=16, heads=heads, dim=dim,
                                              num_rows=num_rows, max_delta=5000, seed=2)
    dst_rows = torch.arange(num_rows, device=kernel_device)
    slots = torch.randperm(num_blocks * block_size)[:num_rows]
    slots[::7] = -1  # vLLM's padding slots: nothing is written for them
    slots = slots.to(kernel_device)
    dense = KVDestination(_poisoned(layers, num_rows, heads, dim, dtype, kernel_device),
                          _poisoned(layers, num_rows, heads, dim, dtype, kernel_device), dst_rows)
    # FlashAttention's per-layer [2, num_blocks, block_size, H, D], stacked over layers:
    # K and V are strided views of one allocation, as vLLM hands them over.
    kv_cache = torch.full((layers, 2, num_blocks, block_size, heads, dim), float("nan"),
                          dtype=dtype, device=kernel_device)
    paged = KVDestination.paged(kv_cache[:, 0], kv_cache[:, 1], slots)

    _triton()(src, src_rows, deltas, inv_freq, dense, paged)

    expected = KVDestination(dense.keys.clone().fill_(0), dense.values.clone().fill_(0), dst_rows)
    rope_shift_scatter_reference(src, src_rows, deltas, inv_freq, expected)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_error(dense.keys, expected.keys) < bound
    assert torch.equal(dense.values, expected.values)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for row, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        written[slot] = True
        block, offset = divmod(slot, block_size)
        assert torch.equal(kv_cache[:, 0, block, offset], dense.keys[:, row])
        assert torch.equal(kv_cache[:, 1, block, offset], dense.values[:, row])
    unwritten = kv_cache.flatten(2, 3)[:, :, ~written.to(kernel_device)]
    assert unwritten.isnan().all()


def test_dispatch_runs_the_reference_off_cuda():
    src, src_rows, deltas, inv_freq = _inputs("cpu", torch.float32, chunks=1, layers=2,
                                              rows_per_chunk=6, heads=2, dim=8, num_rows=6,
                                              max_delta=50, seed=3)
    rows = torch.arange(6)
    out = KVDestination(torch.zeros(2, 6, 2, 8), torch.zeros(2, 6, 2, 8), rows)
    rope_shift_scatter(src[0], src_rows, deltas, inv_freq, out)  # [L, 2, N, H, D] form
    from kvshare.recompute.rope import rerotate_keys

    taken = src[0][:, :, src_rows]
    assert torch.equal(out.keys, rerotate_keys(taken[:, 0], deltas, inv_freq))
    assert torch.equal(out.values, taken[:, 1])


def test_bad_inputs_are_named():
    src, src_rows, deltas, inv_freq = _inputs("cpu", torch.float32, chunks=1, layers=2,
                                              rows_per_chunk=4, heads=2, dim=8, num_rows=4,
                                              max_delta=5, seed=4)
    rows = torch.arange(4)
    good = KVDestination(torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8), rows)
    with pytest.raises(ValueError, match="inv_freq has shape"):
        rope_shift_scatter(src, src_rows, deltas, inv_freq[:2], good)
    with pytest.raises(ValueError, match="dense keys/values must be"):
        rope_shift_scatter(src, src_rows, deltas, inv_freq,
                           KVDestination(torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8), rows))
    with pytest.raises(ValueError, match="deltas must be int64"):
        rope_shift_scatter(src, src_rows, deltas.int(), inv_freq, good)


def test_llama3_8b_sized_bf16_on_gpu(cuda):
    """512 MiB of chunk KV, deltas up to 32K, dense + paged, against the reference."""
    layers, heads, dim, chunks, per_chunk = 32, 8, 128, 16, 256
    num_rows = chunks * per_chunk - 96
    src, src_rows, deltas, inv_freq = _inputs(cuda, torch.bfloat16, chunks=chunks, layers=layers,
                                              rows_per_chunk=per_chunk, heads=heads, dim=dim,
                                              num_rows=num_rows, max_delta=32768, seed=5)
    total_rows = chunks * per_chunk
    dst_rows = torch.randperm(total_rows, device=cuda)[:num_rows]
    out = KVDestination(_poisoned(layers, total_rows, heads, dim, torch.bfloat16, cuda),
                        _poisoned(layers, total_rows, heads, dim, torch.bfloat16, cuda), dst_rows)
    ref = KVDestination(out.keys.clone(), out.values.clone(), dst_rows)
    key_cache = torch.full((layers, total_rows // 16, 16, heads, dim), float("nan"),
                           dtype=torch.bfloat16, device=cuda)
    paged = KVDestination.paged(key_cache, torch.full_like(key_cache, float("nan")), dst_rows)

    rope_shift_scatter(src, src_rows, deltas, inv_freq, out, paged)
    rope_shift_scatter_reference(src, src_rows, deltas, inv_freq, ref)

    assert rel_error(out.keys[:, dst_rows], ref.keys[:, dst_rows]) < 1e-2
    assert torch.equal(out.values[:, dst_rows], ref.values[:, dst_rows])
    assert torch.equal(paged.keys.nan_to_num(7.0), out.keys.nan_to_num(7.0))
    assert torch.equal(paged.values.nan_to_num(7.0), out.values.nan_to_num(7.0))
    assert int(out.keys.isnan().flatten(2).all(2).sum()) == layers * (total_rows - num_rows)
