"""KVShareConnector on a real vLLM CPU engine with SmolLM2-135M-Instruct.

Claims are read from vLLM's own ``num_cached_tokens`` (its prefix hit + the connector's
claim) and from the connector's load report in ``kv_transfer_params["kvshare"]``.
"""

from __future__ import annotations

import pytest

from kvshare.config import KVShareConfig
from kvshare.storage.keys import chunk_keys

pytestmark = pytest.mark.engine

SPLIT = 257
"""Prompt length whose vanilla prefill is split 256 + 1 (the engines' token budget), the
same split a full kvshare claim imposes."""


def report(out) -> dict:
    assert out.kv_transfer_params is not None, "no kvshare load report for this request"
    return out.kv_transfer_params["kvshare"]


def test_engines_split_like_a_full_claim(engine):
    assert engine.budget == SPLIT - 1


def test_identical_prompt_reuses_all_but_the_last_token(engine, report_tokens):
    prompt = report_tokens[:300]
    first = engine.run(prompt, "identical")
    assert first.num_cached_tokens == 0 and first.kv_transfer_params is None
    again = engine.run(prompt, "identical")
    # vLLM's prefix cache supplies whole 128-token blocks; kvshare claims the rest but one.
    assert again.num_cached_tokens == len(prompt) - 1
    assert report(again)["claimed"] == len(prompt) - 1 - 256
    assert report(again)["loaded"] == report(again)["claimed"]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


@pytest.mark.parametrize(("edit_at", "prefix_hit"), [(100, 0), (200, 128)],
                         ids=["no-prefix-hit", "after-a-prefix-hit"])
def test_rho_one_reproduces_vanilla_vllm_under_the_same_split(engine, report_tokens, edit_at,
                                                              prefix_hit):
    base = report_tokens[10 + edit_at:10 + edit_at + SPLIT]
    tenant = f"exact-{edit_at}"
    engine.run(base, tenant)
    edited = base[:edit_at] + report_tokens[500:504] + base[edit_at + 4:]
    reused = engine.run(edited, tenant, rho=1.0)
    vanilla = engine.run(edited, tenant + "-vanilla")
    assert vanilla.num_cached_tokens == 0
    # vLLM's prefix cache supplies the blocks before the edit; kvshare recomputes the rest.
    assert reused.num_cached_tokens == SPLIT - 1 and report(reused)["loaded"] > 0
    assert report(reused)["claimed"] == report(reused)["recomputed"] == SPLIT - 1 - prefix_hit
    assert reused.outputs[0].token_ids == vanilla.outputs[0].token_ids


@pytest.fixture(scope="module")
def edit_base(engine, report_tokens) -> list[int]:
    """A 400-token prompt stored once in tenant "edits"; edits are never stored (claimed)."""
    base = report_tokens[20:20 + 400]
    engine.run(base, "edits")
    return base


@pytest.mark.parametrize("edit", ["replace", "insert", "delete"])
def test_edits_plan_load_and_answer(engine, report_tokens, edit_base, edit):
    base, tenant = edit_base, "edits"
    new = {
        "replace": base[:150] + report_tokens[600:604] + base[154:],
        "insert": base[:150] + report_tokens[600:606] + base[150:],
        "delete": base[:150] + base[156:],
    }[edit]
    reused = engine.run(new, tenant)
    vanilla = engine.run(new, f"edits-vanilla-{edit}")
    stats = report(reused)
    # The edit is at 150: vLLM's prefix cache supplies block 0, kvshare the rest but one.
    assert reused.num_cached_tokens == len(new) - 1
    assert stats["claimed"] == len(new) - 1 - 128 and not stats["fallback"]
    assert stats["loaded"] >= stats["claimed"] - 16
    assert 0 < stats["recomputed"] < stats["claimed"] / 2  # placeholders + DHD's 15%
    assert len(reused.outputs[0].token_ids) == 8
    assert reused.outputs[0].token_ids[0] == vanilla.outputs[0].token_ids[0]


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_lost_chunks_are_recomputed(engine, report_tokens, damage):
    base = report_tokens[30:30 + SPLIT]
    tenant = f"lost-{damage}"
    engine.run(base, tenant)
    first_chunk = engine.chunk_dir / f"{chunk_keys(engine.model_id, base, 256)[0].hex()}.kvc"
    assert first_chunk.is_file()
    if damage == "delete":
        first_chunk.unlink()
    else:
        data = bytearray(first_chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        first_chunk.write_bytes(bytes(data))
    edited = base[:100] + report_tokens[700:703] + base[103:]
    reused = engine.run(edited, tenant)
    vanilla = engine.run(edited, tenant + "-vanilla")
    assert report(reused)["claimed"] == SPLIT - 1
    assert report(reused)["loaded"] == 0  # every run came from the lost chunk
    assert reused.outputs[0].token_ids == vanilla.outputs[0].token_ids


def test_tenants_never_mix(engine, report_tokens):
    prompt = report_tokens[40:40 + 300]
    engine.run(prompt, "tenant-a")
    other = engine.run(prompt, "tenant-b")
    assert other.num_cached_tokens == 0 and other.kv_transfer_params is None
    same = engine.run(prompt, "tenant-a")
    assert same.num_cached_tokens == len(prompt) - 1


def test_prefix_caching_off_claims_everything_but_the_last_token(strict_engine, report_tokens):
    prompt = report_tokens[50:50 + SPLIT]
    first = strict_engine.run(prompt, "strict")
    again = strict_engine.run(prompt, "strict")
    assert report(again)["claimed"] == SPLIT - 1 == again.num_cached_tokens
    # Everything was loaded: kvshare recomputes the prompt's tail and DHD's share of the rest.
    config = KVShareConfig()
    tail = config.recompute_tail_tokens
    assert report(again)["recomputed"] == tail + round(config.rho * (SPLIT - 1 - tail))
    assert again.outputs[0].token_ids[0] == first.outputs[0].token_ids[0]

