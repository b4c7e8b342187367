"""Small real KV chunks for the storage tests (imported by name: tests have no packages)."""

from __future__ import annotations

import torch

from kvshare.storage.chunk import KVChunk, KVLayout, split_prompt_kv

SMALL = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)


def random_kv(layout: KVLayout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """KV-like values of ``layout``'s dtype: gaussian floats, uniform integers."""
    gen = torch.Generator().manual_seed(seed)
    shape = layout.shape(num_tokens)
    if layout.dtype in (torch.int8, torch.uint8):
        info = torch.iinfo(layout.dtype)
        return torch.randint(info.min, info.max + 1, shape, generator=gen, dtype=layout.dtype)
    return torch.randn(shape, generator=gen).mul(2.0).to(layout.dtype)


def make_chunks(num_tokens: int, chunk_tokens: int, layout: KVLayout = SMALL, seed: int = 0,
                model_id: str = "test-model") -> list[KVChunk]:
    """One prompt's chunks (public scope): tokens ``seed*1000 + i``, random KV."""
    token_ids = [seed * 1000 + i for i in range(num_tokens)]
    return split_prompt_kv(model_id, random_kv(layout, num_tokens, seed), token_ids, chunk_tokens,
                           scope="")


def assert_same_chunk(got: KVChunk | None, want: KVChunk) -> None:
    assert got is not None, f"chunk {want.key.hex()} missing"
    assert got.header == want.header
    assert torch.equal(got.kv.cpu().view(torch.uint8), want.kv.contiguous().view(torch.uint8))
