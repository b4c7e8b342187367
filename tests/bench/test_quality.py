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


def test_rouge_and_score_on_hand_made_outputs():
    assert Q.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert Q.rouge_l("", "") == 1.0
    assert Q.rouge_l("/* {} */ ==>", "/* {} */ ==>") == 1.0  # no word for rouge-score
    assert Q.rouge_l("completely different words", "the cat sat") == 0.0
    partial = Q.rouge_l("the cat sat", "the cat sat on the mat")
    assert partial == pytest.approx(2 * 1.0 * 0.5 / 1.5)

    refs = [Q.Outcome([1, 2, 3], "the cat sat", 1.0, 0.5),
            Q.Outcome([4, 5], "a dog ran", 1.0, 0.5)]
    outs = [Q.Outcome([1, 2, 3], "the cat sat", 0.2, 0.1, claimed=True),
            Q.Outcome([9, 5], "some bird flew", 0.4, 0.3)]
    row = Q.score(outs, refs)
    assert row["rouge_l"] == pytest.approx(0.5)
    assert row["exact_match"] == 0.5
    assert row["first_token_agree"] == 0.5
    assert row["recompute_fraction"] == pytest.approx(0.3)
    assert row["claimed_fraction"] == 0.5
    assert row["ttft_median_s"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="1 outcomes for 2 references"):
        Q.score(outs[:1], refs)


def test_recompute_fraction_counts_vllm_and_connector_compute():
    # 100-token prompt: vLLM prefix hit 32, connector claimed 67 (recomputed 10), vLLM 1.
    assert Q.recompute_fraction(100, 99, {"claimed": 67, "recomputed": 10}) == pytest.approx(0.11)
    assert Q.recompute_fraction(100, 32, None) == pytest.approx(0.68)
    assert Q.recompute_fraction(100, 0, None) == 1.0
    with pytest.raises(ValueError, match="prompt_tokens must be > 0, got 0"):
        Q.recompute_fraction(0, 0, None)


def test_connector_configs_match_the_systems():
    kv = Q.connector_config("kvshare", 0.3, "/tmp/h", 0.0)
    assert kv["rho"] == 0.3 and kv["home"] == "/tmp/h" and "planner" not in kv
    assert Q.connector_config("naive", 0.3, "/h", 0.0)["check_layers"] == []
    blend = Q.connector_config("cacheblend", 0.3, "/h", 0.0)
    assert blend["planner"] == "chunk256" and blend["rho"] == 0.15
    from kvshare.config import KVShareConfig

    for name in Q.CONNECTOR_SYSTEMS:  # every key is a real config key
        KVShareConfig.from_dict(Q.connector_config(name, 0.15, "/h", 0.5))
    with pytest.raises(ValueError, match="'gptcache' is not a connector system"):
        Q.connector_config("gptcache", 0.1, "/h", 0.0)


def _results():
    row = {"rouge_l": 0.9, "exact_match": 0.5, "first_token_agree": 1.0,
           "recompute_fraction": 0.2, "claimed_fraction": 1.0, "ttft_median_s": 0.1,
           "pairs": 2, "available": True}
    return {
        "pairs": 2, "pair_kinds": {"similar": 1, "edit": 1}, "rho": 0.15, "seed": 0,
        "max_new_tokens": 64, "reference_ttft_median_s": 0.4,
        "systems": {"kvshare": {**row, "rouge_l_vs_split": 0.95},
                    "naive": Q.unavailable("naive", "connector not available: x"),
                    "split": {**row, "recompute_fraction": 1.0}},
        "sweep": {"0.15": {"rho": 0.15, **row, "exact_match_vs_split": 0.5,
                           "rouge_l_vs_split": 0.95}},
    }


def test_json_shape_and_markdown_table(tmp_path):
    results = _results()
    data = json.loads(json.dumps(results))
    for name, row in data["systems"].items():
        assert set(Q.METRIC_KEYS) <= set(row), name
    assert data["systems"]["naive"]["rouge_l"] is None
    table = Q.markdown_table(results)
    assert "| kvshare | 0.900 █████████░ | 50% | 100% | 20.0% | 100 ms | 100% | 0.950 |" in table
    assert "| split | 0.900 █████████░ | 50% | 100% | 100.0% | 100 ms |  | - |" in table
    assert "connector not available: x" in table
    assert "| 0.15 | 0.900 █████████░ | 50% | 100% | 20.0% | 100 ms | 50% | 0.950 |" in table
    Q.plot_sweep(results, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_cli_rejects_bad_values():
    parser = argparse.ArgumentParser()
    Q.add_arguments(parser)
    for argv, message in ([["--pairs", "1"], "--pairs must be >= 2"],
                          [["--rho", "1.5"], "--rho must be in [0, 1], got 1.5"],
                          [["--systems", "kvshare,lmcache"], "unknown system(s) ['lmcache']"]):
        args = parser.parse_args(argv)
        args.config = None
        with pytest.raises(SystemExit, match=re.escape(message)):
            Q.run(args)


def test_split_filler_leaves_n_minus_one_tokens_in_the_second_step():
    budget, n = 800, 301
    filler = Q.split_filler(7, budget, n)
    assert set(filler) == {7}
    first_step = budget                      # the filler alone (or first in the queue)
    second_step_for_request = budget - (len(filler) - first_step)
    assert second_step_for_request == n - 1
    with pytest.raises(ValueError, match="need 2 <= prompt_tokens <= budget, got 900 and 800"):
        Q.split_filler(7, 800, 900)
