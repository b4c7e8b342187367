"""The claim rule and the origin of a claimed prompt's KV, on hand-made plans."""

from __future__ import annotations

import numpy as np
import pytest

from kvshare.config import KVShareConfig
from kvshare.matching.claim import claimed_runs, decide_claim, kv_origin
from kvshare.matching.plan import ReusePlan, ReuseRun
from kvshare.storage.index import IndexEntry

TAIL = 64


def plan_of(num_tokens: int, *runs: tuple[int, str, int, int]) -> ReusePlan:
    reuse = [ReuseRun(*run) for run in runs]
    covered = np.zeros(num_tokens, bool)
    for run in reuse:
        covered[run.dst_start:run.dst_end] = True
    return ReusePlan(num_tokens, reuse, np.flatnonzero(~covered))


def entry(entry_id: str, num_tokens: int, depth: int = 0, exact_tokens: int | None = None
          ) -> IndexEntry:
    return IndexEntry(entry_id, "m", "", np.ones(4, np.float32), np.arange(num_tokens),
                      depth=depth, exact_tokens=exact_tokens)


@pytest.fixture
def config() -> KVShareConfig:
    return KVShareConfig(recompute_tail_tokens=TAIL, min_reuse_tokens=64,
                         min_reuse_fraction=0.5)


def test_the_claim_stops_before_the_tail_vllm_computes(config):
    plan = plan_of(1000, (0, "a", 0, 500), (501, "a", 600, 498))
    claim = decide_claim(plan, 256, config)
    assert (claim.start, claim.end) == (256, 1000 - 1 - TAIL)
    # Reuse inside the claim: [256, 500) and [501, 935).
    assert claim.planned_reuse == 244 + 434
    assert claim.expected_reused(0.15) == 678 - round(0.15 * 678)


def test_verbatim_rows_continue_an_exact_source_prefix_and_dhd_skips_them(config):
    plan = plan_of(1000, (0, "a", 0, 500), (501, "a", 600, 498))
    assert decide_claim(plan, 256, config).verbatim == 0  # no sources: none known
    claim = decide_claim(plan, 256, config, {"a": entry("a", 1100)})
    assert (claim.verbatim, claim.verbatim_end) == (500 - 256, 500)
    assert claim.expected_reused(0.15) == 678 - round(0.15 * (678 - 244))
    # Only rows inside the source's exact prefix are verbatim.
    claim = decide_claim(plan, 256, config, {"a": entry("a", 1100, depth=1, exact_tokens=300)})
    assert claim.verbatim_end == 300
    # A shared prefix that vLLM's hit already covers leaves nothing verbatim to claim.
    assert decide_claim(plan_of(1000, (0, "a", 0, 200), (201, "a", 300, 798)), 256, config,
                        {"a": entry("a", 1100)}).verbatim == 0


def test_kvshare_computed_tail_claims_to_the_last_token(config):
    config.recompute_tail_by = "kvshare"
    claim = decide_claim(plan_of(1000, (0, "a", 0, 999)), 0, config)
    assert (claim.start, claim.end, claim.planned_reuse) == (0, 999, 1000 - 1 - TAIL)


@pytest.mark.parametrize(("plan", "num_computed", "min_tokens"), [
    (plan_of(1000, (0, "a", 0, 400)), 0, 64),                   # reuses 40% < 50%
    (plan_of(200, (0, "a", 0, 60), (61, "a", 90, 50)), 0, 200),  # 110 tokens < 200
    (plan_of(1000, (0, "a", 0, 999)), 960, 64),                 # vLLM's hit passes the end
], ids=["below-fraction", "below-tokens", "behind-vllm-hit"])
def test_nothing_is_claimed(config, plan, num_computed, min_tokens):
    config.min_reuse_tokens = min_tokens
    assert decide_claim(plan, num_computed, config).num_claimed == 0


def test_claimed_runs_are_cut_to_the_claim(config):
    plan = plan_of(1000, (0, "a", 0, 300), (301, "b", 10, 690))
    claim = decide_claim(plan, 256, config)
    assert claimed_runs(plan, claim) == [ReuseRun(256, "a", 256, 44),
                                         ReuseRun(301, "b", 10, claim.end - 301)]


def test_kv_origin_follows_the_exact_prefix_then_the_deepest_source(config):
    plan = plan_of(1000, (0, "a", 0, 400), (401, "b", 50, 598))
    claim = decide_claim(plan, 128, config)
    sources = {"a": entry("a", 900), "b": entry("b", 800, depth=2, exact_tokens=40)}
    assert kv_origin(claim, plan, sources, 1000, 0) == (400, 3)
    # Rows of b inside its exact prefix count as exact.
    sources["b"] = entry("b", 800, depth=2, exact_tokens=700)
    assert kv_origin(claim, plan, sources, 1000, 0) == (400, 1)
    # An approximate prefix-cache hit starting earlier wins.
    assert kv_origin(claim, plan, sources, 256, 1) == (256, 1)


def test_an_identical_exact_source_keeps_the_prompt_exact(config):
    plan = plan_of(1000, (0, "a", 0, 999))
    claim = decide_claim(plan, 0, config)
    assert kv_origin(claim, plan, {"a": entry("a", 1000)}, 1000, 0) == (1000, 0)
    # ... but not when the source itself is approximate inside the claim.
    approx = {"a": entry("a", 1000, depth=1, exact_tokens=300)}
    assert kv_origin(claim, plan, approx, 1000, 0) == (300, 2)
