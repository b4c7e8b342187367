"""KVShareConnector on a real vLLM CPU engine with SmolLM2-135M-Instruct: claims, loads
and answers.

Claims are read from vLLM's own ``num_cached_tokens`` (its prefix hit + the connector's
claim) and from the connector's load report in ``kv_transfer_params["kvshare"]``.
"""

from __future__ import annotations

import os

import pytest
from engines import BUDGET, SPLIT, TAIL

from kvshare.plugin import ONEDNN_CACHE_CAPACITY
from kvshare.storage.keys import chunk_keys

pytestmark = pytest.mark.engine


def report(out) -> dict:
    assert out.kv_transfer_params is not None, "no kvshare load report for this request"
    return out.kv_transfer_params["kvshare"]


def test_engines_split_like_a_full_claim(engine):
    assert engine.budget == BUDGET == SPLIT - TAIL - 1


def test_the_plugin_capped_onednn_kernels_before_the_model_loaded(engine):
    # The in-process engine's worker is this process (see kvshare.plugin).
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE_CAPACITY)


def test_the_in_process_engine_runs_the_vec_layout_whatever_the_host(engine):
    # vLLM's attention and kvshare's reads of its cache both see the layout of hosts
    # without AMX (conftest.py); the strict engine keeps this host's own pick.
    assert engine.worker.paged.isa == "vec"
    assert {layer.isa for layer in engine.worker.paged.layers} == {"vec"}


def test_identical_prompt_is_claimed_up_to_the_tail(strict_engine, report_tokens):
    prompt = report_tokens[:SPLIT]
    first = strict_engine.run(prompt, "identical")
    assert first.num_cached_tokens == 0 and first.kv_transfer_params is None
    again = strict_engine.run(prompt, "identical")
    stats = report(again)
    # Prefix caching is off: kvshare claims everything but the tail, vLLM computes the tail.
    assert again.num_cached_tokens == stats["claimed"] == SPLIT - 1 - TAIL
    assert stats["loaded"] == stats["claimed"] and not stats["fallback"]
    # Every claimed row copies the stored exact prefix verbatim: none is recomputed, so
    # the KV is bit for bit the first request's and so is the answer.
    assert stats["recomputed"] == 0 and stats["reused"] == stats["claimed"]
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
    # vLLM's prefix cache supplies the blocks before the edit; kvshare fills the rest up to
    # the tail: the rows before the edit verbatim (the stored prompt's own), all others
    # recomputed at rho 1; vLLM computes the tail.
    stats = report(reused)
    verbatim = edit_at - prefix_hit
    assert reused.num_cached_tokens == BUDGET and stats["loaded"] > 0
    assert stats["claimed"] == BUDGET - prefix_hit
    assert stats["recomputed"] == stats["claimed"] - verbatim
    assert stats["reused"] == verbatim
    assert reused.outputs[0].token_ids == vanilla.outputs[0].token_ids


@pytest.fixture(scope="module")
def edit_base(engine, report_tokens) -> list[int]:
    """A 500-token prompt stored once in tenant "edits"."""
    base = report_tokens[20:20 + 500]
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
    # The edit is at 150: vLLM's prefix cache supplies block 0, kvshare the rest but the tail.
    assert reused.num_cached_tokens == len(new) - 1 - TAIL
    assert stats["claimed"] == len(new) - 1 - TAIL - 128 and not stats["fallback"]
    assert stats["loaded"] >= stats["claimed"] - 16
    assert 0 < stats["recomputed"] < stats["claimed"] / 2  # placeholders + DHD's 15%
    assert stats["reused"] == stats["claimed"] - stats["recomputed"]
    assert len(reused.outputs[0].token_ids) == 8
    assert reused.outputs[0].token_ids[0] == vanilla.outputs[0].token_ids[0]


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_lost_chunks_are_recomputed_and_their_entry_is_dropped(engine, report_tokens, damage):
    base = report_tokens[30:30 + SPLIT]
    tenant = f"lost-{damage}"
    engine.run(base, tenant)
    engine.settle()
    keys = chunk_keys(engine.model_id, base, 256, scope=tenant)
    first_chunk = engine.chunk_dir / f"{keys[0].hex()}.kvc"
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
    assert report(reused)["claimed"] == BUDGET
    assert report(reused)["loaded"] == 0  # every run came from the lost chunk
    assert reused.outputs[0].token_ids == vanilla.outputs[0].token_ids
    # The load found the chunk gone: the base's entry is dropped, so it is claimed no
    # more; the edit itself was stored, as an approximation of depth 1.
    engine.settle()
    assert [(e.token_ids.tolist(), e.depth) for e in engine.entries(tenant)] == [(edited, 1)]


def test_tenants_never_mix(engine, report_tokens):
    prompt = report_tokens[40:40 + SPLIT]
    engine.run(prompt, "tenant-a")
    other = engine.run(prompt, "tenant-b")
    assert other.num_cached_tokens == 0 and other.kv_transfer_params is None
    same = engine.run(prompt, "tenant-a")
    assert same.num_cached_tokens == SPLIT - 1 - TAIL


def test_tenants_never_share_chunk_bytes(engine, report_tokens):
    prompt = report_tokens[45:45 + SPLIT]
    for tenant in ("bytes-a", "bytes-b"):
        engine.run(prompt, tenant)
    engine.settle()
    keys = {tenant: chunk_keys(engine.model_id, prompt, 256, scope=tenant)
            for tenant in ("bytes-a", "bytes-b")}
    assert not set(keys["bytes-a"]) & set(keys["bytes-b"])
    for tenant in keys:
        assert [e.chunk_keys for e in engine.entries(tenant)] == [[k.hex() for k in keys[tenant]]]
        assert all((engine.chunk_dir / f"{k.hex()}.kvc").is_file() for k in keys[tenant])


def test_an_adaptive_budget_sets_the_recompute_unless_the_request_fixes_rho(
        engine, report_tokens, monkeypatch):
    """rho_min = rho_max pins the adaptive budget: the fill recomputes that share of the
    reused tokens; a request's own ``kvshare_rho`` keeps the fixed rule."""
    import dataclasses

    from kvshare.recompute import MassBudget

    base = report_tokens[300:300 + SPLIT]
    tenant = "adaptive"
    engine.run(base, tenant)
    edits = [base[:120] + report_tokens[900 + i:904 + i] + base[124:] for i in range(3)]
    fixed = report(engine.run(edits[0], tenant, rho=0.15))["recomputed"]
    config = dataclasses.replace(engine.scheduler.config, rho_mass=0.5, rho_min=0.6,
                                 rho_max=0.6)
    monkeypatch.setattr(engine.scheduler, "config", config)
    monkeypatch.setattr(engine.worker, "_budget", MassBudget(0.5, 0.6, 0.6))
    adaptive = report(engine.run(edits[1], tenant))["recomputed"]
    overridden = report(engine.run(edits[2], tenant, rho=0.15))["recomputed"]
    assert adaptive > 2 * fixed
    assert abs(overridden - fixed) <= 2  # the same rule on a same-sized edit



def test_a_request_may_reuse_without_being_stored(engine, report_tokens):
    base = report_tokens[50:50 + SPLIT]
    tenant = "no-store"
    engine.run(base, tenant)
    engine.settle()
    edited = base[:120] + report_tokens[800:803] + base[123:]
    kept_out = engine.run(edited, tenant, extra_args={"kvshare_store": 0})
    engine.settle()
    assert report(kept_out)["reused"] > 0
    assert [e.token_ids.tolist() for e in engine.entries(tenant)] == [base]
