"""The GPU loader: rows mapped from runs, streamed layer by layer, equal to loading first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvshare.recompute.engine import PromptKV, SelectiveRecomputeEngine
from kvshare.recompute.kv_loader import LayerwiseKVLoader, ReusedRows
from kvshare.recompute.rope import rerotate_keys


def test_rows_from_runs_index_the_loaded_chunks():
    # Chunks of 4 tokens; chunks 1 and 3 of the source are loaded, in that order.
    rows = ReusedRows.from_runs([(0, 5, 2), (3, 12, 3)], chunk_starts=[4, 12], chunk_tokens=4)
    assert rows.dst_positions.tolist() == [0, 1, 3, 4, 5]
    assert rows.deltas.tolist() == [-5, -5, -9, -9, -9]
    # Source 5, 6 are tokens 1, 2 of slot 0; source 12..14 are tokens 0..2 of slot 1.
    assert rows.src_rows.tolist() == [1, 2, 4, 5, 6]


def test_rows_from_runs_name_missing_chunks():
    with pytest.raises(ValueError, match=r"source chunks \[2\]"):
        ReusedRows.from_runs([(0, 6, 4)], chunk_starts=[4], chunk_tokens=4)


@pytest.fixture
def tiny_on_cuda(make_tiny):
    if not torch.cuda.is_available():
        pytest.skip("the loader streams to a CUDA device")
    pytest.importorskip("triton")
    loaded = make_tiny("llama", num_hidden_layers=6)
    loaded.model.to("cuda")
    from kvshare.recompute.hf_adapter import HFDecoderAdapter

    return HFDecoderAdapter(loaded.model)


def _donor_chunks(adapter, donor, chunk_tokens):
    kv = PromptKV.empty(adapter, len(donor))
    SelectiveRecomputeEngine(adapter, rho=1.0).prefill(donor, kv, [], logits=False)
    stacked = torch.stack([kv.keys, kv.values], dim=1).cpu()
    return [stacked[:, :, s:s + chunk_tokens].contiguous().pin_memory()
            for s in range(0, len(donor), chunk_tokens)]


def test_streamed_rows_land_rerotated_and_skip_early_layers(tiny_on_cuda):
    adapter = tiny_on_cuda
    rng = np.random.default_rng(0)
    donor = rng.integers(0, 256, 40)
    chunks = _donor_chunks(adapter, donor, chunk_tokens=16)  # 16 + 16 + 8 rows
    runs = [(0, 0, 10), (12, 13, 20), (35, 34, 4)]
    rows = ReusedRows.from_runs(runs, [0, 16, 32], 16)
    poisoned = torch.full((6, 40, adapter.num_kv_heads, adapter.head_dim), float("nan"),
                          device="cuda")
    kv = PromptKV(poisoned, poisoned.clone())
    loader = LayerwiseKVLoader(chunks, rows, 16, adapter.rope_inv_freq, kv, first_layer=2)
    for layer in range(6):
        loader.before_layer(layer)
    loader.finish()
    torch.cuda.synchronize()

    source = torch.cat(chunks, dim=2)  # [L, 2, 40, H, D]
    src = torch.from_numpy(np.concatenate([np.arange(s, s + n) for _, s, n in runs]))
    dst = torch.from_numpy(rows.dst_positions)
    expected_keys = rerotate_keys(source[:, 0, src], torch.from_numpy(rows.deltas),
                                  adapter.rope_inv_freq.cpu())
    got = kv.keys.cpu()
    assert got[:2].isnan().all() and kv.values[:2].isnan().all()  # layers 0, 1: not loaded
    assert torch.allclose(got[2:, dst], expected_keys[2:], rtol=1e-5, atol=1e-6)
    assert torch.equal(kv.values.cpu()[2:, dst], source[2:, 1, src])
    not_reused = torch.ones(40, dtype=torch.bool)
    not_reused[dst] = False
    assert got[2:, not_reused].isnan().all()


def test_streaming_gives_what_loading_first_gives(tiny_on_cuda):
    adapter = tiny_on_cuda
    rng = np.random.default_rng(1)
    donor = rng.integers(0, 256, 64)
    chunks = _donor_chunks(adapter, donor, chunk_tokens=16)
    target = donor.copy()
    target[20:24] = rng.integers(0, 256, 4)
    target[-1] = 7
    runs = [(0, 0, 20), (24, 24, 39)]
    recompute = [20, 21, 22, 23, 63]
    rows = ReusedRows.from_runs(runs, [0, 16, 32, 48], 16)
    engine = SelectiveRecomputeEngine(adapter, rho=0.2, check_layers=(1,))
    results = []
    for streamed in (False, True):
        kv = PromptKV.empty(adapter, 64)
        loader = LayerwiseKVLoader(chunks, rows, 16, adapter.rope_inv_freq, kv,
                                   engine.first_reused_layer)
        if not streamed:
            loader.finish()
        results.append(engine.prefill(target, kv, recompute,
                                      before_layer=loader.before_layer if streamed else None))
        loader.finish()
    preloaded, streamed_result = results
    assert torch.equal(preloaded.kv.keys, streamed_result.kv.keys)
    assert torch.equal(preloaded.kv.values, streamed_result.kv.values)
    assert torch.equal(preloaded.last_logits, streamed_result.last_logits)
    assert torch.equal(preloaded.selected, streamed_result.selected)
