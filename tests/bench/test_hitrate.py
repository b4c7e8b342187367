"""``kvshare bench hitrate`` end to end on a tiny real stream: rows, JSON and table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvshare.bench import hitrate
from kvshare.bench.workload import Workload
from kvshare.config import KVShareConfig

TEMPLATE = (
    "Dear {name}, thank you for your order of twelve boxes of green tea and four tins of "
    "roasted coffee beans. The parcel left our warehouse in Lyon this morning and should "
    "reach {city} within three working days. If anything arrives damaged, reply to this "
    "email with a photo and we will send a replacement at no cost. Our spring catalogue "
    "is attached; returning customers get ten percent off every order placed before the "
    "end of April. Please write a friendlier version of this email for {name} and keep "
    "it under one hundred words."
)
PEOPLE = [("Alice", "Geneva"), ("Bruno", "Turin"), ("Chloe", "Annecy"), ("Dmitri", "Basel")]


def test_replay_reports_plan_level_and_connector_rows(tmp_path, tokenizer, wordllama):
    texts = [TEMPLATE.format(name=name, city=city) for name, city in PEOPLE]
    token_ids = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"], np.int32)
                 for t in texts]
    workload = Workload(texts, token_ids, wordllama.embed(texts))
    config = KVShareConfig(home=str(tmp_path), min_reuse_tokens=16, recompute_tail_tokens=16)
    setup = hitrate.ConnectorSetup(kv_cache_tokens=1 << 14, bytes_per_token=23_040,
                                   depths=(0, None))
    stream = hitrate.replay(workload, np.arange(len(texts)), config, wordllama, "similar",
                            setup)
    policies = stream["policies"]
    assert list(policies) == ["prefix", "chunk256", "gptcache", "kvshare", "connector",
                              "connector_depth0", "connector_depth_unlimited", "oracle",
                              "oracle_lcs"]
    connector, kvshare = policies["connector"], policies["kvshare"]
    assert connector["max_approx_depth"] == 1
    # Each later letter differs from an earlier one in a name and a city only: every one
    # is claimed, and the connector reuses less than the plan (tail, rho) but a lot.
    assert connector["claimed_requests"] == 3 and connector["claimed_fraction"] == 0.75
    assert 0.4 < connector["reused_token_fraction"] < kvshare["reused_token_fraction"]
    fractions = connector["token_fractions"]
    assert fractions["lost_to_rho"] > 0 and fractions["lost_to_tail"] > 0
    assert fractions["reused"] == pytest.approx(
        fractions["plan"] - fractions["lost_to_thresholds"] - fractions["lost_to_tail"]
        - fractions["lost_to_missing_chunks"] - fractions["lost_to_rho"]
        + fractions["prefix_hit_beyond_plan"])
    assert policies["connector_depth0"]["stored_by_depth"] == {"0": 1}

    results = {"streams": {"similar": stream}, "config": {}}
    json.dumps(hitrate._without_per_request(results))  # serialisable as written
    table = hitrate.markdown_table(results)
    assert "| kvshare (plan-level upper bound) |" in table
    assert "| connector (as the connector runs, max_approx_depth 1) |" in table
    assert "| connector_depth_unlimited (as the connector runs, max_approx_depth unlimited) |" \
        in table
    assert "connector / kvshare (plan-level): " in table


def test_depths_and_row_names():
    assert hitrate.parse_depths("0, 2,unlimited,2") == (0, 2, None)
    with pytest.raises(SystemExit, match="--depths item '-1' is neither"):
        hitrate.parse_depths("-1")
    config = KVShareConfig(max_approx_depth=2)
    assert [hitrate.connector_name(d, config) for d in (2, 0, None)] == \
        ["connector", "connector_depth0", "connector_depth_unlimited"]
    assert hitrate.tier_capacities(KVShareConfig(disk_dir="none", cpu_bytes=5)) == [5]
