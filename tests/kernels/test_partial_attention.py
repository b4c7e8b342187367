"""partial_attention: the Triton kernel against attention written out in float64.

The float64 reference is independent of both implementations (scores, mask by position,
softmax, values, per request), so it also checks the SDPA reference. On CPU the kernel
runs in Triton's interpreter with small tiles, so that query blocks span unmasked and
masked key blocks; on a GPU compiled, with bf16 and Llama-3-8B heads.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_error

from kvshare.kernels.partial_attention import partial_attention, partial_attention_reference

SMALL_TILES = (8, 16, 4, 1)
"""(BLOCK_M, BLOCK_N, num_warps, num_stages): several key blocks even for short prompts."""


def _triton(*args, **kwargs):
    from kvshare.kernels._partial_attention_triton import partial_attention_triton

    return partial_attention_triton(*args, **kwargs)


def _positions(num_keys: int, num_q: int, g: torch.Generator) -> torch.Tensor:
    """``num_q`` sorted distinct positions with 0 and the last one among them."""
    middle = torch.randperm(num_keys - 2, generator=g)[:max(num_q - 2, 0)] + 1
    ends = torch.tensor([0, num_keys - 1])[: min(num_q, 2)]
    return torch.cat([ends, middle]).sort().values


def _request(num_keys, num_q, heads, kv_heads, dim, g):
    q = torch.randn(num_q, heads, dim, generator=g)
    keys = torch.randn(num_keys, kv_heads, dim, generator=g)
    values = torch.randn(num_keys, kv_heads, dim, generator=g)
    return q, _positions(num_keys, num_q, g), keys, values


def _float64_attention(q, positions, keys, values, scale):
    """Per (query, head): softmax over keys at or before the query's position."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)  # [T, Hq, D]
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,thd->hnt", q.double(), k) * scale
    visible = torch.arange(keys.shape[0])[None, :] <= positions[:, None].cpu()
    scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    return torch.einsum("hnt,thd->nhd", scores.softmax(-1), v)


def _bound(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 2, 16), (6, 2, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_request_matches_float64(kernel_device, heads, kv_heads, dim, dtype):
    """GQA groups of 2 and 3 (padded to 4 rows in the kernel's tile)."""
    if kernel_device.type == "cuda":
        dtype = torch.bfloat16
    g = torch.Generator().manual_seed(heads * 100 + dim)
    q, positions, keys, values = _request(70, 23, heads, kv_heads, dim, g)
    scale = dim ** -0.5
    expected = _float64_attention(q, positions, keys, values, scale)
    out = _triton(q.to(kernel_device, dtype), positions.to(kernel_device),
                  keys.to(kernel_device, dtype), values.to(kernel_device, dtype), scale,
                  config=SMALL_TILES)
    assert rel_error(out.cpu(), expected) < _bound(dtype)
    reference = partial_attention_reference(q.double(), positions, keys.double(),
                                            values.double(), scale)
    assert rel_error(reference, expected) < 1e-12


def test_several_requests_in_one_launch(kernel_device):
    """Varlen: requests of different lengths, one with no queries, one querying every row."""
    dtype = torch.float32 if kernel_device.type == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, dim, scale = 4, 2, 16, 0.3
    shapes = [(50, 10), (33, 0), (64, 64), (17, 1)]
    requests = [_request(t, n, heads, kv_heads, dim, g) if n else
                (torch.zeros(0, heads, dim), torch.zeros(0, dtype=torch.int64),
                 *_request(t, 2, heads, kv_heads, dim, g)[2:])
                for t, n in shapes]
    q = torch.cat([r[0] for r in requests])
    positions = torch.cat([r[1] for r in requests])
    keys = torch.cat([r[2] for r in requests])
    values = torch.cat([r[3] for r in requests])
    cu_q = torch.tensor([0] + [n for _, n in shapes]).cumsum(0).int()
    cu_k = torch.tensor([0] + [t for t, _ in shapes]).cumsum(0).int()

    on = {"device": kernel_device}
    out = _triton(q.to(**on, dtype=dtype), positions.to(**on), keys.to(**on, dtype=dtype),
                  values.to(**on, dtype=dtype), scale, cu_q.to(**on), cu_k.to(**on),
                  max(n for _, n in shapes), config=SMALL_TILES).cpu()

    expected = torch.cat([_float64_attention(*r, scale) for r in requests if r[0].shape[0]])
    assert rel_error(out, expected) < _bound(dtype)
    reference = partial_attention_reference(q, positions, keys, values, scale, cu_q, cu_k)
    assert rel_error(reference, expected) < 1e-5


def test_dispatch_runs_the_reference_off_cuda():
    g = torch.Generator().manual_seed(8)
    q, positions, keys, values = _request(20, 5, 4, 1, 8, g)
    out = partial_attention(q, positions, keys, values, 0.5)
    assert torch.equal(out, partial_attention_reference(q, positions, keys, values, 0.5))


def test_bad_inputs_are_named():
    g = torch.Generator().manual_seed(9)
    q, positions, keys, values = _request(20, 5, 4, 2, 8, g)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        partial_attention(q[:, :3], positions, keys, values, 0.5)
    with pytest.raises(ValueError, match="q_positions must be int64"):
        partial_attention(q, positions.int(), keys, values, 0.5)
    with pytest.raises(ValueError, match="give both cu_seqlens_q and cu_seqlens_k"):
        partial_attention(q, positions, keys, values, 0.5, torch.tensor([0, 5]))


@pytest.mark.parametrize("num_keys", [4096, 16384])
def test_llama3_8b_heads_bf16_on_gpu(cuda, num_keys):
    """10% of the positions as queries, 32 query and 8 KV heads of 128, default tiles."""
    g = torch.Generator().manual_seed(num_keys)
    q, positions, keys, values = _request(num_keys, num_keys // 10, 32, 8, 128, g)
    scale = 128 ** -0.5
    expected = partial_attention_reference(*(t.to(cuda) for t in (q, positions, keys, values)),
                                           scale)
    out = partial_attention(*(t.to(cuda, torch.bfloat16) if t.is_floating_point() else t.to(cuda)
                              for t in (q, positions, keys, values)), scale)
    assert out.dtype == torch.bfloat16
    assert rel_error(out.float(), expected) < 1e-2


def test_varlen_bf16_on_gpu(cuda):
    g = torch.Generator().manual_seed(11)
    shapes = [(4096, 400), (8192, 1), (2048, 2048), (6000, 600)]
    requests = [_request(t, n, 32, 8, 128, g) for t, n in shapes]
    cat = [torch.cat([r[i] for r in requests]) for i in range(4)]
    cu_q = torch.tensor([0] + [n for _, n in shapes]).cumsum(0).int()
    cu_k = torch.tensor([0] + [t for t, _ in shapes]).cumsum(0).int()
    scale = 128 ** -0.5
    out = partial_attention(cat[0].to(cuda, torch.bfloat16), cat[1].to(cuda),
                            cat[2].to(cuda, torch.bfloat16), cat[3].to(cuda, torch.bfloat16),
                            scale, cu_q.to(cuda), cu_k.to(cuda), max(n for _, n in shapes))
    expected = partial_attention_reference(cat[0].to(cuda), cat[1].to(cuda), cat[2].to(cuda),
                                           cat[3].to(cuda), scale, cu_q.to(cuda), cu_k.to(cuda))
    assert rel_error(out.float(), expected) < 1e-2
