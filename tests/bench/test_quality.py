"""Pure parts of ``kvshare bench quality``: pairs, edits, metrics, JSON and table shape.

No engine starts here (the connector tests own the engine budget).
"""

from __future__ import annotations

import argparse
import json
import random
import re

import numpy as np
import pytest

from kvshare.bench import pairs as P
from kvshare.bench import quality as Q
from kvshare.bench import teacher_forcing as TF
from kvshare.bench.reuse import RequestReuse

TEXT = ("I am planning a trip with Marta to Lisbon in October 2023. Marta wants to see "
        "3 museums and eat at 2 restaurants. We have a budget of 1500 euros. "
        "Can you write a plan for us? Please keep it short.")


def test_swap_name_replaces_every_occurrence():
    edit = P.swap_name(TEXT, random.Random(0))
    assert edit is not None and edit.kind == "name"
    assert edit.old == "Marta"  # the recurring capitalised word
    assert edit.old not in edit.text and edit.text.count(edit.new) == 2
    assert edit.text == TEXT.replace("Marta", edit.new)


def test_swap_number_changes_one_number_keeping_its_shape():
    for seed in range(20):
        edit = P.swap_number(TEXT, random.Random(seed))
        assert edit is not None and edit.old != edit.new
        assert len(edit.new) == len(edit.old)
        before, after = re.findall(r"\d+", TEXT), re.findall(r"\d+", edit.text)
        assert len(before) == len(after)
        assert sum(a != b for a, b in zip(before, after)) == 1


def test_swap_date_changes_a_year_or_month():
    seen = set()
    for seed in range(20):
        edit = P.swap_date(TEXT, random.Random(seed))
        assert edit is not None and edit.old in ("October", "2023") and edit.new != edit.old
        assert edit.text.replace(edit.new, edit.old, 1) == TEXT
        seen.add(edit.old)
    assert seen == {"October", "2023"}
    assert P.swap_date("no dates in here at all", random.Random(0)) is None


def test_insert_clause_adds_one_sentence_between_sentences():
    edit = P.insert_clause(TEXT, random.Random(1))
    assert edit is not None and edit.new in P.CLAUSES
    assert edit.text.replace(" " + edit.new, "", 1) == TEXT
    assert not edit.text.startswith(edit.new) and not edit.text.endswith(edit.new)


def test_delete_clause_removes_a_middle_sentence():
    edit = P.delete_clause(TEXT, random.Random(2))
    assert edit is not None and edit.old and edit.old not in edit.text
    assert len(edit.text) < len(TEXT)
    assert edit.text.startswith("I am planning") and edit.text.endswith("keep it short.")
    assert P.delete_clause("One sentence. Two sentences.", random.Random(0)) is None


def _corpus(n=40):
    rng = random.Random(7)
    texts = []
    for i in range(n):
        sentences = [f"Sentence {j} about Project{i} in {rng.choice(P.MONTHS)} {2000 + j}."
                     for j in range(4)]
        texts.append(f"Dear Alex, I talked to Alex about item {i}. " + " ".join(sentences))
    return texts


def test_edit_pairs_are_deterministic_per_seed_and_cover_kinds():
    texts = _corpus()
    counts = [100] * len(texts)
    a = P.edit_pairs(texts, counts, 10, seed=3, min_tokens=10, max_tokens=200)
    b = P.edit_pairs(texts, counts, 10, seed=3, min_tokens=10, max_tokens=200)
    c = P.edit_pairs(texts, counts, 10, seed=4, min_tokens=10, max_tokens=200)
    assert a == b and a != c
    assert len(a) == 10
    assert [p.kind for p in a] == [f"edit:{k}" for k in P.EDIT_KINDS] * 2
    assert all(p.earlier != p.later and p.earlier in texts for p in a)
    assert len({p.earlier for p in a}) == 10  # each text used once


def test_edit_pairs_respect_length_and_exclusions():
    texts = _corpus(10)
    counts = [10] * 5 + [100] * 5
    pairs = P.edit_pairs(texts, counts, 20, seed=0, min_tokens=50, max_tokens=200,
                         exclude={texts[5]})
    assert {p.earlier for p in pairs} <= set(texts[6:])
    with pytest.raises(ValueError, match="unknown edit kind"):
        P.edit_pairs(texts, counts, 2, seed=0, min_tokens=1, max_tokens=200, kinds=["rename"])


def test_similar_pairs_take_nearest_earlier_with_token_overlap():
    base = np.array([1.0, 0.0, 0.0], np.float32)
    near = np.array([0.99, 0.14, 0.0], np.float32)
    far = np.array([0.0, 0.0, 1.0], np.float32)
    embeddings = np.stack([base, far, near / np.linalg.norm(near), far])
    tokens = [np.arange(100), np.arange(500, 600), np.r_[np.arange(90), [7] * 10],
              np.arange(900, 1000)]
    texts = ["a", "b", "c", "d"]
    pairs = P.similar_pairs(texts, tokens, embeddings, 5, min_tokens=10, max_tokens=1000)
    # b-d are identical in embedding but share no tokens; a-c overlap 90%.
    assert [(p.earlier, p.later) for p in pairs] == [("a", "c")]
    assert P.token_overlap(tokens[0], tokens[2]) == pytest.approx(0.9)
    assert P.similar_pairs(texts, tokens, embeddings, 5, min_tokens=10, max_tokens=1000,
                           min_token_overlap=0.0)[1].later == "d"


def test_draw_is_seeded_ordered_and_honours_exclusions():
    pairs = [P.Pair(f"similar-{i}", "similar", f"e{i}", f"l{i}") for i in range(30)]
    a, b = P.draw(pairs, 8, seed=1), P.draw(pairs, 8, seed=2)
    assert a == P.draw(pairs, 8, seed=1) and a != b
    assert [p.pair_id for p in a] == sorted((p.pair_id for p in a), key=lambda x: int(x[8:]))
    held_out = P.draw(pairs, 8, seed=7, exclude={t for p in a + b for t in (p.earlier, p.later)})
    assert not {p.pair_id for p in held_out} & {p.pair_id for p in a + b}
    assert len(P.draw(pairs, 100, seed=0)) == 30  # never more than there are


def _reuse(prompt=100, cached=0, report=None):
    return RequestReuse.of(prompt, cached, report)


def test_rouge_and_score_on_hand_made_outputs():
    assert Q.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert Q.rouge_l("", "") == 1.0
    assert Q.rouge_l("/* {} */ ==>", "/* {} */ ==>") == 1.0  # no word for rouge-score
    assert Q.rouge_l("completely different words", "the cat sat") == 0.0
    partial = Q.rouge_l("the cat sat", "the cat sat on the mat")
    assert partial == pytest.approx(2 * 1.0 * 0.5 / 1.5)

    refs = [Q.Outcome([1, 2, 3], "the cat sat", _reuse(), 0.5),
            Q.Outcome([4, 5], "a dog ran", _reuse(), 0.5)]
    # 100-token prompts: 80 claimed of which 10 recomputed (reused 70); prefix hit 40 only.
    claimed = {"claimed": 80, "loaded": 80, "recomputed": 10, "reused": 70, "fallback": False}
    outs = [Q.Outcome([1, 2, 3], "the cat sat", _reuse(100, 99, claimed), 0.1),
            Q.Outcome([9, 5], "some bird flew", _reuse(100, 40), 0.3)]
    row = Q.score(outs, refs)
    assert row["rouge_l"] == pytest.approx(0.5)
    assert row["exact_match"] == 0.5
    assert row["first_token_agree"] == 0.5
    # computed: 1 - (19 + 70) / 100 = 0.11 and 1 - 40 / 100 = 0.6
    assert row["recompute_fraction"] == pytest.approx((0.11 + 0.6) / 2)
    assert row["reused_fraction"] == pytest.approx((0.89 + 0.4) / 2)
    assert row["claimed_fraction"] == 0.5
    assert row["ttft_median_s"] == pytest.approx(0.2)
    assert row["kl_mean"] is None and row["top1_agree"] is None  # not teacher-forced
    assert row["fallbacks"] == 0
    with pytest.raises(ValueError, match="1 outcomes for 2 references"):
        Q.score(outs[:1], refs)


def test_score_counts_fallbacks_claim_mismatches_and_teacher_forced_means():
    refs = [Q.Outcome([1], "a", _reuse()), Q.Outcome([2], "b", _reuse())]
    fell = {"claimed": 90, "loaded": 90, "recomputed": 90, "reused": 0, "fallback": True}
    fine = {"claimed": 90, "loaded": 90, "recomputed": 20, "reused": 70, "fallback": False}
    other = {"claimed": 60, "loaded": 60, "recomputed": 20, "reused": 40, "fallback": False}
    outs = [
        Q.Outcome([1], "a", _reuse(100, 95, fell),
                  forced=[TF.PositionScore(0.2, True, 0.01), TF.PositionScore(0.4, False, 0.03)],
                  forced_reuse=_reuse(164, 95, fine)),
        Q.Outcome([2], "b", _reuse(100, 95, fine),
                  forced=[TF.PositionScore(0.0, True, 0.02)],
                  forced_reuse=_reuse(164, 65, other)),
    ]
    row = Q.score(outs, refs)
    assert row["fallbacks"] == 1 and row["requests"] == 4
    assert row["forced_claim_mismatches"] == 1  # pair 2: greedy claimed 90, forced 60
    # every position weighs the same, whichever prompt it belongs to
    assert row["kl_mean"] == pytest.approx(0.2)
    assert row["top1_agree"] == pytest.approx(2 / 3)
    assert row["kl_rest_mass"] == pytest.approx(0.02)
    assert row["forced_positions"] == 3


def test_vanilla_gptcache_and_split_outcomes_have_no_claims():
    refs = [Q.Outcome([1], "a", _reuse())]
    gpt = Q.score([Q.Outcome([1], "a", None)], refs)
    assert gpt["recompute_fraction"] == 0.0 and gpt["reused_fraction"] is None
    assert gpt["requests"] == 0 and gpt["fallbacks"] == 0


def test_split_heads_follow_the_claim_rule():
    from kvshare.config import KVShareConfig

    heads = Q.split_heads(KVShareConfig(recompute_tail_tokens=64))
    assert heads["split"](500) == 499
    assert heads["split_tail"](500) == 500 - 1 - 64
    assert Q.split_heads(KVShareConfig(recompute_tail_tokens=32))["split_tail"](500) == 467
    assert Q.matching_split({"recompute_tail_by": "kvshare"}) == "split"
    assert Q.matching_split({"recompute_tail_by": "vllm"}) == "split_tail"


def test_connector_systems_layer_on_the_base_config():
    from kvshare.bench.engine_config import connector_config
    from kvshare.config import KVShareConfig

    base = KVShareConfig(check_layers=[2], recompute_tail_tokens=32, rho=0.2)
    kv = connector_config(base, **Q.connector_overrides("kvshare", None, "/h", 0.0))
    assert kv["rho"] == 0.2 and kv["check_layers"] == [2] and kv["recompute_tail_tokens"] == 32
    assert kv["home"] == "/h" and kv["min_reuse_tokens"] == 1 and kv["planner"] == "align"
    assert kv["recompute_tail_by"] == "vllm"
    assert connector_config(base, **Q.connector_overrides("kvshare", 0.3, "/h", 0.0))["rho"] == 0.3
    tailkv = connector_config(base, **Q.connector_overrides("kvshare_tailkv", None, "/h", 0.0))
    assert tailkv["recompute_tail_by"] == "kvshare" and tailkv["check_layers"] == [2]
    adaptive = connector_config(base, **Q.connector_overrides("kvshare_adaptive", 0.3, "/h", 0.0,
                                                                 rho_mass=0.6))
    assert adaptive["rho_mass"] == 0.6 and adaptive["rho"] == 0.2  # --rho is kvshare's
    naive = connector_config(base, **Q.connector_overrides("naive", 0.3, "/h", 0.0))
    assert naive["check_layers"] == [] and naive["rho"] == 0.0
    assert naive["recompute_tail_tokens"] == 32  # the YAML's base still applies
    blend = connector_config(base, **Q.connector_overrides("cacheblend", 0.3, "/h", 0.5))
    assert blend["planner"] == "chunk256" and blend["rho"] == 0.15
    assert blend["min_reuse_fraction"] == 0.5
    assert set(kv) == set(KVShareConfig().to_dict())  # complete: nothing left to the engine
    with pytest.raises(ValueError, match="'gptcache' is not a connector system"):
        Q.connector_overrides("gptcache", 0.1, "/h", 0.0)


def test_requests_give_teacher_forcing_its_own_scope_and_the_reference():
    pair = Q.PreparedPair("p0", "similar", "", list(range(10, 60)), list(range(10, 70)))
    reqs = {r.req_id: r for r in Q.connector_requests([pair], "kvshare", [None, 0.3])}
    greedy, forced = reqs["later/kvshare/p0"], reqs["tf/kvshare/p0"]
    assert greedy.salt == reqs["earlier/kvshare/p0"].salt == "kvshare/p0"
    assert forced.salt == reqs["earlier/tf/kvshare/p0"].salt != greedy.salt
    assert forced.forced_from == "later/ref/p0" and forced.reference_from == "tf/ref/p0"
    assert forced.token_ids == pair.later_ids and forced.top_k == Q.SYSTEM_TOP_K
    assert greedy.rho is None and reqs["tf/kvshare/0.3/p0"].rho == 0.3
    order = list(reqs)
    assert all(r.startswith("warmup/") for r in order[:4])  # first calls stay out of TTFT
    assert order.index("earlier/tf/kvshare/p0") < order.index("tf/kvshare/p0")

    from kvshare.config import KVShareConfig

    tail = KVShareConfig().recompute_tail_tokens
    long_pair = Q.PreparedPair("p1", "edit:name", "", list(range(10, 110)), list(range(10, 130)))
    short_pair = Q.PreparedPair("p2", "similar", "", list(range(10, 20)),
                                list(range(10, 11 + tail)))  # claims nothing: all tail
    heads = Q.split_heads(KVShareConfig())
    vanilla = {r.req_id: r for r in Q.vanilla_requests(
        [pair, long_pair, short_pair], ["prefix", "split_tail"], 200, heads, filler_token=7)}
    assert vanilla["tf/ref/p0"].forced_from == "later/ref/p0"
    assert vanilla["tf/ref/p0"].reference_from is None  # the reference returns its rows
    assert vanilla["tf/ref/p0"].top_k == Q.REFERENCE_TOP_K
    assert vanilla["tf/vanilla/p0"].reference_from == "tf/ref/p0"  # the self-check
    assert vanilla["tf/prefix/p0"].salt == vanilla["earlier/tf/prefix/p0"].salt
    split = vanilla["tf/split_tail/p1"]
    assert split.filler_ids == vanilla["later/split_tail/p1"].filler_ids
    assert len(split.filler_ids) == 2 * 200 - (120 - 1 - tail)  # head: where the claim ends
    assert vanilla["later/split_tail/p2"].filler_ids is None  # one step, as nothing is claimed
    assert "later/split/p0" not in vanilla and "earlier/prefix/p0" in vanilla


def _results():
    row = {"rouge_l": 0.9, "exact_match": 0.5, "first_token_agree": 1.0, "kl_mean": 0.0123,
           "top1_agree": 0.953, "recompute_fraction": 0.2, "claimed_fraction": 1.0,
           "ttft_median_s": 0.1, "pairs": 2, "available": True, "fallbacks": 0, "requests": 4,
           "config": None}
    return {
        "pairs": 2, "pair_kinds": {"similar": 1, "edit": 1}, "rho": 0.15, "seed": 7,
        "excluded_seeds": [1, 2], "max_new_tokens": 64, "reference_ttft_median_s": 0.4,
        "teacher_forcing": {"reference_top_k": 500, "system_top_k": 1000,
                            "reference_rest_mass": 0.031, "positions": 128,
                            "vanilla_vs_vanilla": {"kl_mean": 0.0, "top1_agree": 1.0}},
        "systems": {"kvshare": {**row, "config": {"rho": 0.15}, "fallbacks": 2,
                                "split_system": "split_tail", "rouge_l_vs_split": 0.95},
                    "naive": Q.unavailable("naive", "connector not available: x"),
                    "split_tail": {**row, "recompute_fraction": 1.0}},
        "sweep": {"0.15": {"rho": 0.15, **row, "fallbacks": 2, "exact_match_vs_split": 0.5,
                           "rouge_l_vs_split": 0.95}},
    }


def test_json_shape_and_markdown_table(tmp_path):
    results = _results()
    data = json.loads(json.dumps(results))
    for name, row in data["systems"].items():
        assert set(Q.METRIC_KEYS) <= set(row), name
    assert data["systems"]["naive"]["rouge_l"] is None
    table = Q.markdown_table(results)
    assert "seed 7 (pairs of seeds 1, 2 left out)" in table
    assert ("| kvshare | 95.3% | 0.0123 | 0.900 █████████░ | 50% | 100% | 20.0% | 100 ms "
            "| 100% | 2 | 0.950 (split_tail) |") in table
    assert "| split_tail | 95.3% | 0.0123 | 0.900 █████████░ | 50% | 100% | 100.0% | 100 ms " \
        "| - | - | - |" in table
    assert "connector not available: x" in table
    assert "**fallbacks** (selective fill failed, claim recomputed in full): kvshare 2 of 4 " \
        "requests." in table
    assert "rest holds 3.1% of full compute's probability" in table
    assert "Vanilla vs vanilla: KL 0.0000, top-1 100%" in table
    assert ("| 0.15 | 95.3% | 0.0123 | 0.900 █████████░ | 50% | 100% | 20.0% | 100 ms | 2 "
            "| 50% | 0.950 |") in table
    Q.plot_sweep(results, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_a_run_without_fallbacks_says_so():
    results = _results()
    results["systems"]["kvshare"]["fallbacks"] = 0
    assert "fallbacks: none (kvshare)." in Q.markdown_table(results)


def test_cli_rejects_bad_values():
    parser = argparse.ArgumentParser()
    Q.add_arguments(parser)
    for argv, message in ([["--pairs", "1"], "--pairs must be >= 2"],
                          [["--rho", "1.5"], "--rho must be in [0, 1], got 1.5"],
                          [["--systems", "kvshare,lmcache"], "unknown system(s) ['lmcache']"],
                          [["--exclude-seeds", "1,x"], "--exclude-seeds expects integers"],
                          [["--seed", "1", "--exclude-seeds", "1,2"],
                           "--seed 1 is also in --exclude-seeds 1,2"],
                          [["--set", "rho"], "--set expects KEY=VALUE, got 'rho'"],
                          [["--set", "rhoo=1"], "unknown kvshare config key 'rhoo'"]):
        args = parser.parse_args(argv)
        args.config = None
        with pytest.raises(SystemExit, match=re.escape(message)):
            Q.run(args)


def test_split_filler_leaves_the_head_in_the_second_step():
    budget, head = 800, 300
    filler = Q.split_filler(7, budget, head)
    assert set(filler) == {7}
    first_step = budget                      # the filler alone (or first in the queue)
    second_step_for_request = budget - (len(filler) - first_step)
    assert second_step_for_request == head
    with pytest.raises(ValueError, match="need 1 <= head_tokens < budget, got 800 and 800"):
        Q.split_filler(7, 800, 800)
